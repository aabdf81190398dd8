"""Synthetic in-domain prompts for `dspark gen-data` (`dspark synth-prompts`).

The drafter learns to predict the TARGET's answers, so what it needs from a prompt set is the kind of
question users ask (grade-school math, short algebra, Python tasks), not any particular answer. ShareGPT's
math and code conversations are few (26% of its prompts, all used by the sixth drafter), and the eval
sets must not be trained on, so this module writes such questions itself: word problems and number
questions from templates filled with seeded random names and numbers, and Python tasks composed from
operation x subject tables, asked either as a one-line request or as a typed function stub with a
docstring. Nothing here is taken from a benchmark. Deterministic for a seed; exact duplicates are dropped.
"""

from __future__ import annotations

import json
import random
from typing import Callable, Iterator

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

NAMES = ("Maria", "James", "Aisha", "Tom", "Lena", "Carlos", "Priya", "Ben", "Sofia", "Kenji", "Olivia", "Omar",
         "Hannah", "Liam", "Mei", "Noah", "Zara", "Ethan", "Grace", "Diego", "Nina", "Samuel", "Chloe", "Ravi",
         "Emma", "Lucas", "Fatima", "Jack", "Isla", "Mateo", "Ava", "Yusuf", "Ella", "Leo", "Ruby", "Hugo")
GOODS = (("apples", 0.5), ("notebooks", 3), ("pencils", 0.25), ("cupcakes", 2), ("books", 12), ("T-shirts", 15),
         ("movie tickets", 9), ("bags of rice", 7), ("candles", 4), ("plants", 6), ("toy cars", 5), ("pizzas", 11),
         ("bottles of juice", 2.5), ("packs of stickers", 1.5), ("loaves of bread", 3.5), ("concert tickets", 45))
PLACES = ("the farm", "the bakery", "the school fair", "the library", "the garden", "the market", "the office",
          "the zoo", "the bookstore", "the park")


def _money(x: float) -> str:
    return f"${x:g}" if float(x).is_integer() else f"${x:.2f}"


def _word_problems() -> list[Callable[[random.Random], str]]:
    def shop(r):
        n, (g, p) = r.choice(NAMES), r.choice(GOODS)
        a, b = r.randint(2, 12), r.randint(2, 9)
        return (f"{n} buys {a} {g} at {_money(p)} each and {b} more the next day. {n} pays with a "
                f"{_money(r.choice((50, 100, 200)))} bill. How much change does {n} get?")

    def rate(r):
        n = r.choice(NAMES)
        s, h, extra = r.randint(30, 80), r.randint(2, 6), r.randint(1, 3)
        return (f"{n} drives at {s} miles per hour for {h} hours, then {s - r.randint(5, 20)} miles per hour for "
                f"{extra} more hours. How many miles does {n} drive in total?")

    def eggs(r):
        n, per_day = r.choice(NAMES), r.randint(8, 30)
        eat, bake, price = r.randint(1, 4), r.randint(1, 5), r.choice((1, 1.5, 2, 3))
        return (f"{n}'s hens lay {per_day} eggs a day. {n} uses {eat} for breakfast and {bake} for baking every "
                f"day and sells the rest for {_money(price)} per egg. How much money does {n} make in a week?")

    def fraction_left(r):
        n, total = r.choice(NAMES), r.choice((24, 36, 40, 48, 60, 72, 90, 120))
        f1, f2 = r.choice(((1, 2), (1, 3), (1, 4), (2, 3), (3, 4))), r.choice(((1, 2), (1, 3), (1, 4)))
        g = r.choice(GOODS)[0]
        return (f"{n} had {total} {g}. {n} gave {f1[0]}/{f1[1]} of them to a friend and then sold {f2[0]}/{f2[1]} "
                f"of what was left. How many {g} does {n} have now?")

    def wage(r):
        n, w, h = r.choice(NAMES), r.randint(12, 40), r.randint(30, 50)
        ot = r.choice((1.5, 2))
        return (f"{n} earns {_money(w)} an hour for the first 40 hours of a week and {ot:g} times that for every "
                f"hour over 40. Last week {n} worked {h} hours. How much did {n} earn?")

    def ages(r):
        a, b = r.sample(NAMES, 2)
        x, k, y = r.randint(4, 15), r.randint(2, 4), r.randint(3, 10)
        return (f"{a} is {x} years old. {b} is {k} times as old as {a}. How old will {b} be in {y} years, and "
                f"how old will {a} be then?")

    def percent(r):
        n, (g, p) = r.choice(NAMES), r.choice(GOODS)
        price, off, tax = round(p * r.randint(4, 20), 2), r.choice((10, 15, 20, 25, 30, 40)), r.choice((5, 8, 10))
        return (f"A store sells {g} for {_money(price)}. This week they are {off}% off, and there is a {tax}% "
                f"sales tax on the discounted price. How much does {n} pay for {r.randint(2, 6)} of them?")

    def split(r):
        names = r.sample(NAMES, 3)
        total = r.choice((120, 180, 240, 300, 360, 420))
        ratio = r.choice(((1, 2, 3), (2, 3, 5), (1, 1, 2), (3, 4, 5)))
        return (f"{names[0]}, {names[1]} and {names[2]} share {_money(total)} in the ratio "
                f"{ratio[0]}:{ratio[1]}:{ratio[2]}. How much more does {names[2]} get than {names[0]}?")

    def garden(r):
        n, rows, per = r.choice(NAMES), r.randint(4, 15), r.randint(5, 20)
        dead = r.randint(5, 30)
        return (f"{n} plants {rows} rows of tomatoes with {per} plants in each row. {dead}% of the plants do not "
                f"survive, and each surviving plant gives {r.randint(3, 12)} tomatoes. How many tomatoes does "
                f"{n} harvest?")

    def tank(r):
        cap, fill, leak = r.choice((200, 300, 450, 600, 1000)), r.randint(15, 40), r.randint(2, 10)
        return (f"A tank holds {cap} liters. Water flows in at {fill} liters per minute while a leak lets out "
                f"{leak} liters per minute. Starting empty, how many minutes does it take to fill the tank?")

    def savings(r):
        n, goal, have, per = r.choice(NAMES), r.choice((250, 400, 600, 900, 1200)), r.randint(20, 150), r.randint(15, 60)
        return (f"{n} wants to buy a bike that costs {_money(goal)}. {n} has saved {_money(have)} and saves "
                f"{_money(per)} every week. How many weeks will it take {n} to afford the bike?")

    def class_count(r):
        total, pct_a, frac = r.choice((20, 24, 30, 32, 40)), r.choice((20, 25, 40, 50)), r.choice(((1, 2), (1, 4), (3, 4)))
        return (f"In a class of {total} students, {pct_a}% play soccer. Of the rest, {frac[0]}/{frac[1]} play "
                f"basketball. How many students play neither sport?")

    def recipe(r):
        n, base, want = r.choice(NAMES), r.choice((4, 6, 8)), r.choice((10, 12, 18, 20, 24))
        flour, sugar = r.choice((1.5, 2, 2.5, 3)), r.choice((0.5, 0.75, 1))
        return (f"A recipe for {base} muffins uses {flour:g} cups of flour and {sugar:g} cups of sugar. {n} wants "
                f"to make {want} muffins. How many cups of flour and sugar does {n} need in total?")

    def trip(r):
        a, b = r.sample(NAMES, 2)
        d, s1, s2 = r.choice((120, 180, 240, 300)), r.randint(40, 70), r.randint(30, 60)
        return (f"{a} and {b} start {d} miles apart and drive toward each other, {a} at {s1} miles per hour and "
                f"{b} at {s2} miles per hour. After how many hours do they meet?")

    def collection(r):
        n, s, w, give = r.choice(NAMES), r.randint(20, 90), r.randint(2, 8), r.randint(1, 4)
        return (f"{n} has {s} stamps. Every week {n} buys {w} more and gives away {give}. How many stamps will "
                f"{n} have after {r.randint(4, 12)} weeks?")

    def place(r):
        n, p = r.choice(NAMES), r.choice(PLACES)
        a, b, c = r.randint(10, 60), r.randint(5, 40), r.randint(2, 5)
        return (f"On Monday {a} people visited {p}. On Tuesday {b} more people visited than on Monday, and on "
                f"Wednesday {c} times as many as on Monday. {n} counted the visitors. How many visitors came in "
                f"the three days?")

    return [shop, rate, eggs, fraction_left, wage, ages, percent, split, garden, tank, savings, class_count,
            recipe, trip, collection, place]


def _number_questions() -> list[Callable[[random.Random], str]]:
    def linear(r):
        a, x, b = r.randint(2, 12), r.randint(-10, 15), r.randint(-20, 30)
        return f"Solve for $x$: ${a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}$."

    def system(r):
        x, y = r.randint(-6, 9), r.randint(-6, 9)
        a, b, c, d = r.randint(1, 6), r.randint(1, 6), r.randint(1, 6), -r.randint(1, 6)
        return (f"Solve the system of equations ${a}x + {b}y = {a * x + b * y}$ and ${c}x - {-d}y = {c * x + d * y}$. "
                f"What is $x + y$?")

    def remainder(r):
        a, n, m = r.randint(2, 13), r.randint(20, 200), r.randint(3, 11)
        return f"What is the remainder when ${a}^{{{n}}}$ is divided by ${m}$?"

    def gcd_lcm(r):
        a, b = r.randint(12, 400), r.randint(12, 400)
        return f"Find the greatest common divisor and the least common multiple of {a} and {b}."

    def series(r):
        a, d, n = r.randint(1, 20), r.randint(2, 9), r.randint(10, 60)
        return f"What is the sum of the first {n} terms of the arithmetic sequence {a}, {a + d}, {a + 2 * d}, ...?"

    def quadratic(r):
        p, q = r.randint(-9, 9), r.randint(-9, 9)
        return (f"Find all real solutions of $x^2 {'-' if p + q >= 0 else '+'} {abs(p + q)}x "
                f"{'+' if p * q >= 0 else '-'} {abs(p * q)} = 0$.")

    def dice(r):
        s = r.randint(3, 11)
        return f"Two fair six-sided dice are rolled. What is the probability that the sum is {s}? Express it as a common fraction."

    def marbles(r):
        red, blue, green, k = r.randint(2, 9), r.randint(2, 9), r.randint(1, 6), r.choice((2, 3))
        return (f"A bag has {red} red, {blue} blue and {green} green marbles. {k} marbles are drawn without "
                f"replacement. What is the probability that all of them are red?")

    def choose(r):
        n, k = r.randint(6, 14), r.randint(2, 5)
        return f"In how many ways can a committee of {k} people be chosen from a group of {n} people?"

    def area(r):
        a, b = r.randint(3, 20), r.randint(3, 20)
        shape = r.choice((f"a rectangle with sides {a} and {b}", f"a right triangle with legs {a} and {b}",
                          f"a circle with radius {a}", f"a trapezoid with parallel sides {a} and {b} and height {r.randint(2, 12)}"))
        return f"What is the area of {shape}?"

    def compose(r):
        a, b, c, x = r.randint(2, 7), r.randint(-5, 9), r.randint(2, 5), r.randint(-3, 6)
        return f"Let $f(x) = {a}x + {b}$ and $g(x) = x^2 - {c}$. What is $f(g({x}))$?"

    def digits(r):
        n = r.randint(2, 4)
        return f"How many {n}-digit positive integers are divisible by {r.randint(3, 17)}?"

    return [linear, system, remainder, gcd_lcm, series, quadratic, dice, marbles, choose, area, compose, digits]


# Python tasks: (request, function name, parameters, return type). Lists are composed from a verb and a filter.
_LIST_VERBS = (("find the sum of", "sum", "int"), ("count", "count", "int"), ("return a list of", "get", "List[int]"),
               ("find the product of", "product", "int"), ("find the average of", "average", "float"),
               ("return the largest of", "max", "int"), ("return the smallest of", "min", "int"),
               ("remove", "remove", "List[int]"), ("return the indices of", "indices", "List[int]"),
               ("square", "square", "List[int]"))
_LIST_FILTERS = (("the even numbers", "even"), ("the odd numbers", "odd"), ("the prime numbers", "primes"),
                 ("the negative numbers", "negatives"), ("the positive numbers", "positives"),
                 ("the perfect squares", "squares"), ("the numbers divisible by {k}", "divisible_by_{k}"),
                 ("the numbers greater than {k}", "greater_than_{k}"), ("the duplicate elements", "duplicates"),
                 ("the elements that appear exactly once", "uniques"), ("the palindromic numbers", "palindromes"),
                 ("the numbers whose digits sum to an even number", "even_digit_sum"),
                 ("the elements at odd indices", "odd_index"), ("the local maxima", "local_maxima"),
                 ("the Fibonacci numbers", "fibonacci"))
_STRING_VERBS = (("count", "count", "int"), ("remove", "remove", "str"), ("find the first of", "first", "str"),
                 ("find the last of", "last", "str"), ("replace with '*' each of", "mask", "str"),
                 ("return a sorted list of", "sorted", "List[str]"), ("check whether a string has at least {k} of", "has", "bool"))
_STRING_TARGETS = (("the vowels", "vowels"), ("the consonants", "consonants"), ("the digits", "digits"),
                   ("the uppercase letters", "uppercase"), ("the punctuation characters", "punctuation"),
                   ("the repeated characters", "repeated_chars"), ("the words longer than {k} characters", "long_words"),
                   ("the words that start with a vowel", "vowel_words"))
_OTHER_TASKS = (
    ("check whether a string is a palindrome, ignoring case and non-letters", "is_palindrome", "s: str", "bool"),
    ("reverse the order of the words in a sentence", "reverse_words", "sentence: str", "str"),
    ("convert a snake_case string to camelCase", "snake_to_camel", "s: str", "str"),
    ("check whether two strings are anagrams of each other", "are_anagrams", "a: str, b: str", "bool"),
    ("find the longest common prefix of a list of strings", "longest_common_prefix", "words: List[str]", "str"),
    ("compress a string by replacing runs of a character with the character and the run length", "run_length_encode", "s: str", "str"),
    ("find the n-th Fibonacci number", "fibonacci", "n: int", "int"),
    ("check whether a number is prime", "is_prime", "n: int", "bool"),
    ("find the sum of the digits of a number", "digit_sum", "n: int", "int"),
    ("check whether a number is a perfect number", "is_perfect", "n: int", "bool"),
    ("convert a decimal number to its binary representation as a string", "to_binary", "n: int", "str"),
    ("find all prime factors of a number", "prime_factors", "n: int", "List[int]"),
    ("compute the factorial of a number", "factorial", "n: int", "int"),
    ("count the number of set bits in the binary representation of a number", "count_set_bits", "n: int", "int"),
    ("find the k-th largest element of a list", "kth_largest", "numbers: List[int], k: int", "int"),
    ("rotate a list to the right by k positions", "rotate_right", "items: List[int], k: int", "List[int]"),
    ("merge two sorted lists into one sorted list", "merge_sorted", "a: List[int], b: List[int]", "List[int]"),
    ("find the length of the longest increasing subsequence of a list", "longest_increasing_subsequence", "numbers: List[int]", "int"),
    ("find the maximum sum of a contiguous sublist", "max_subarray_sum", "numbers: List[int]", "int"),
    ("flatten a nested list of arbitrary depth", "flatten", "items: list", "list"),
    ("split a list into chunks of size k", "chunks", "items: list, k: int", "List[list]"),
    ("find the two numbers in a list that add up to a target and return their indices", "two_sum", "numbers: List[int], target: int", "Tuple[int, int]"),
    ("transpose a matrix given as a list of lists", "transpose", "matrix: List[List[int]]", "List[List[int]]"),
    ("compute the sum of each row of a matrix", "row_sums", "matrix: List[List[int]]", "List[int]"),
    ("sort a list of tuples by their second element", "sort_by_second", "pairs: List[Tuple[int, int]]", "List[Tuple[int, int]]"),
    ("invert a dictionary, mapping each value to the list of keys that had it", "invert_dict", "d: Dict[str, int]", "Dict[int, List[str]]"),
    ("count how many times each word occurs in a text", "word_counts", "text: str", "Dict[str, int]"),
    ("merge two dictionaries, adding the values of keys present in both", "merge_add", "a: Dict[str, int], b: Dict[str, int]", "Dict[str, int]"),
    ("check whether a string of brackets is balanced", "is_balanced", "s: str", "bool"),
    ("find the area of a triangle given the lengths of its three sides", "triangle_area", "a: float, b: float, c: float", "float"),
    ("compute the volume of a cylinder given its radius and height", "cylinder_volume", "r: float, h: float", "float"),
    ("convert a temperature from Celsius to Fahrenheit", "celsius_to_fahrenheit", "c: float", "float"),
    ("find the greatest common divisor of two numbers", "gcd", "a: int, b: int", "int"),
    ("return the number of days between two dates given as 'YYYY-MM-DD' strings", "days_between", "a: str, b: str", "int"),
    ("check whether a year is a leap year", "is_leap_year", "year: int", "bool"),
    ("find the first non-repeating character of a string", "first_unique_char", "s: str", "str"),
    ("remove duplicate elements from a list while keeping their order", "dedupe", "items: list", "list"),
    ("return all permutations of a string", "permutations", "s: str", "List[str]"),
    ("check whether a list is sorted in non-decreasing order", "is_sorted", "numbers: List[int]", "bool"),
    ("find the missing number in a list containing n distinct numbers from 0 to n", "missing_number", "numbers: List[int]", "int"),
)


def _code_tasks(r: random.Random) -> list[tuple[str, str, str, str]]:
    """Every task once (request, name, params, return type); {k} filled with a small random number."""
    tasks = []
    for verb, vname, ret in _LIST_VERBS:
        for filt, fname in _LIST_FILTERS:
            k = r.randint(2, 9)
            tasks.append((f"{verb} {filt.format(k=k)} in a list of integers", f"{vname}_{fname.format(k=k)}",
                          "numbers: List[int]", ret))
    for verb, vname, ret in _STRING_VERBS:
        for tgt, tname in _STRING_TARGETS:
            k = r.randint(2, 6)
            req = f"{verb.format(k=k)} {tgt.format(k=k)}" + ("" if "string" in verb else " in a string")
            tasks.append((req, f"{vname}_{tname}", "s: str", ret))
    tasks.extend(_OTHER_TASKS)
    return tasks


def _one_line(r: random.Random, task: tuple[str, str, str, str]) -> str:
    return f"Write a {r.choice(('python function', 'function', 'Python function'))} to {task[0]}."


def _stub(r: random.Random, task: tuple[str, str, str, str]) -> str:
    request, name, params, ret = task
    typing = sorted(t for t in ("Dict", "List", "Tuple") if f"{t}[" in params + ret)
    head = f"from typing import {', '.join(typing)}\n\n\n" if typing else ""
    doc = request[0].upper() + request[1:] + "."
    intro = r.choice(("Complete the following Python function:", "Implement this function in Python:",
                      "Write the body of this function and explain how it works:",
                      "Finish this Python function so that it does what its docstring says:"))
    return f'{intro}\n```python\n{head}def {name}({params}) -> {ret}:\n    """ {doc}\n    """\n\n```'


def synth_prompts(num: int, seed: int = 0) -> Iterator[str]:
    """`num` distinct prompts, interleaved so that any prefix keeps the mix: about 45% word problems, 15%
    number questions (both with the step-by-step/boxed instruction 80% of the time), 20% one-line
    Python requests and 20% function stubs. The Python tasks are finite (about 250 of each kind): once
    they are used up, only math is written."""
    r = random.Random(seed)
    words, numbers = _word_problems(), _number_questions()
    code = _code_tasks(r)
    one_line, stubs = code[:], code[:]
    r.shuffle(one_line)
    r.shuffle(stubs)
    seen: set[str] = set()
    misses = 0
    while len(seen) < num:
        u = r.random()
        if u < 0.2 and one_line:
            text = _one_line(r, one_line.pop())
        elif u < 0.4 and stubs:
            text = _stub(r, stubs.pop())
        else:
            make = r.choice(numbers) if r.random() < 0.25 else r.choice(words)
            text = make(r) + (MATH_SUFFIX if r.random() < 0.8 else "")
        if text in seen:
            misses += 1
            if misses > 100 * num:
                raise ValueError(f"could not write {num} distinct prompts (got {len(seen)})")
            continue
        seen.add(text)
        yield text


def write_prompts(path: str, num: int, seed: int = 0) -> int:
    """JSONL of `{"turns": [prompt]}` (what `dspark gen-data --prompts` reads); returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for text in synth_prompts(num, seed):
            f.write(json.dumps({"turns": [text]}) + "\n")
            n += 1
    return n
