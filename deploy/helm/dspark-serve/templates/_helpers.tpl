{{/* Chart name, at most 63 characters (a DNS label). */}}
{{- define "dspark-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "dspark-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dspark-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dspark-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dspark-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "dspark-serve.labels" -}}
helm.sh/chart: {{ include "dspark-serve.chart" . }}
{{ include "dspark-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference-server
{{- end }}

{{- define "dspark-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dspark-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dspark-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the API key, or "" when the server runs without one. */}}
{{- define "dspark-serve.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- include "dspark-serve.fullname" . }}
{{- end }}
{{- end }}

{{- define "dspark-serve.apiKeySecretKey" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecretKey }}
{{- else }}
{{- "api-key" }}
{{- end }}
{{- end }}

{{/*
Seconds the kubelet waits after the preStop hook starts before it kills the container: the
preStop sleep, then the server's drain (--shutdown-grace-period), then up to 5 s to abort what
is left, 5 s for uvicorn to close connections and a few to stop the engine.
*/}}
{{- define "dspark-serve.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (int .Values.preStopSleepSeconds) (int .Values.shutdownGracePeriod) 15 }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The --config YAML: the user's settings plus those the chart owns. */}}
{{- define "dspark-serve.serverConfig" -}}
{{- $owned := dict "port" (int .Values.containerPort) "shutdown-grace-period" (int .Values.shutdownGracePeriod) }}
{{- toYaml (merge $owned (deepCopy (default (dict) .Values.config))) }}
{{- end }}
