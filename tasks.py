"""Countdown, its search traces and reward, AMC/AIME answer checking, and the tokenizer.

Countdown: given a few input numbers and a target, combine every number
exactly once with + - * / and parentheses so that the result is the target.
This file owns everything about the task that the rest of the project uses:

1. The tokenizer: a byte-level tiktoken Encoding with special tokens for the
   prompt and answer structure and for the eviction rate that the prompt may
   carry (budget-aware interoception).
2. A seeded problem generator. A hash of the canonical problem (sorted
   numbers, target) decides its split, so train and test never share a
   problem, whatever the order of its numbers.
3. A depth-first solver that writes down its whole search, dead ends and
   backtracking included. These traces are the warm-start data, in the
   manner of Stream of Search.
4. The prompt format, the answer parser and the reward, kept together so
   that they change together.
5. Answer checking for AMC/AIME-style problems with a \\boxed{} answer.

Print the trace-length distribution and an example prompt and trace:

    python tasks.py --stats --n 1000
"""

import argparse
import functools
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import tiktoken

# -----------------------------------------------------------------------------
# Tokenizer: the 256 bytes, no merges, then the special tokens

BOS = "<|bos|>"
STOP = "<|end|>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"

# Eviction rates that a prompt can carry: 0.00, 0.05, ..., 0.95.
EPS_STEPS = 20
EPS_GRID = tuple(k / EPS_STEPS for k in range(EPS_STEPS))


def _format_eps_tag(step: int) -> str:
    return f"<|eps={step / EPS_STEPS:.2f}|>"


_SPECIAL_NAMES = [BOS, STOP, ANSWER_OPEN, ANSWER_CLOSE] + [_format_eps_tag(k) for k in range(EPS_STEPS)]
SPECIAL_TOKENS = {name: 256 + index for index, name in enumerate(_SPECIAL_NAMES)}

BOS_ID = SPECIAL_TOKENS[BOS]
STOP_ID = SPECIAL_TOKENS[STOP]
ANSWER_OPEN_ID = SPECIAL_TOKENS[ANSWER_OPEN]
ANSWER_CLOSE_ID = SPECIAL_TOKENS[ANSWER_CLOSE]
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """Build the project's tiktoken Encoding once, without any download.

    Rank i is the single byte bytes([i]) and there are no merges, so a text
    encodes to its UTF-8 bytes, except that each special-token string
    becomes one id.
    """
    return tiktoken.Encoding(
        name="ngc-bytes",
        # The pre-split must match every character, because tiktoken drops unmatched text.
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens=SPECIAL_TOKENS,
        explicit_n_vocab=VOCAB_SIZE,
    )


def encode(text: str) -> list[int]:
    """Encode text, reading any special-token string in it as that special token."""
    return get_tokenizer().encode(text, allowed_special="all")


def decode(ids) -> str:
    """Decode token ids (any iterable of ints, a 1-D tensor included) back to text."""
    return get_tokenizer().decode([int(i) for i in ids])


def eps_tag(eps: float) -> str:
    """Return the special token for an eviction rate, e.g. <|eps=0.50|> for 0.5.

    Raises ValueError for a rate that is not on the grid 0.00, 0.05, ..., 0.95.
    """
    scaled = float(eps) * EPS_STEPS
    step = round(scaled) if math.isfinite(scaled) else -1
    if not (0 <= step < EPS_STEPS and abs(scaled - step) < 1e-6):
        raise ValueError(
            f"eviction rate eps={eps!r} is not on the grid 0.00, 0.05, ..., 0.95; "
            f"round it to a multiple of 0.05 below 1"
        )
    return _format_eps_tag(step)


# -----------------------------------------------------------------------------
# Problems and the train/test split

# Share of canonical problems that belong to the test split, in percent.
TEST_PERCENT = 10

# Limits of the generator. A search over more numbers writes traces far too
# long to train on, and larger numbers could push a solution past the
# reward's bound on intermediate values.
MIN_NUMBERS, MAX_NUMBERS = 2, 4
MAX_INPUT_NUMBER = 999


@dataclass(frozen=True)
class Problem:
    """A Countdown problem: use every input number once to reach the target."""

    numbers: tuple[int, ...]
    target: int


def problem_split(problem: Problem) -> str:
    """Return "train" or "test", decided by a hash of the sorted numbers and the target."""
    key = f"{sorted(problem.numbers)}:{problem.target}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def _validate_problem_arguments(n, seed, split, n_numbers, max_number, max_target) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} is invalid; pass a non-negative int")
    if not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} is invalid; pass an int")
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is invalid; pass 'train' or 'test'")
    if not isinstance(n_numbers, int) or not MIN_NUMBERS <= n_numbers <= MAX_NUMBERS:
        raise ValueError(f"n_numbers={n_numbers!r} is invalid; pass an int from {MIN_NUMBERS} to {MAX_NUMBERS}")
    if not isinstance(max_number, int) or not 1 <= max_number <= MAX_INPUT_NUMBER:
        raise ValueError(f"max_number={max_number!r} is invalid; pass an int from 1 to {MAX_INPUT_NUMBER}")
    if not isinstance(max_target, int) or max_target < 1:
        raise ValueError(f"max_target={max_target!r} is invalid; pass a positive int")


def make_problems(
    n: int,
    seed: int,
    split: str = "train",
    n_numbers: int = 3,
    max_number: int = 50,
    max_target: int = 200,
) -> list[Problem]:
    """Generate n distinct solvable problems of one split, the same list for the same arguments.

    Numbers are drawn uniformly from 1..max_number (repeats allowed). The
    target is drawn uniformly from the values in 1..max_target that the
    exhaustive search reaches from those numbers and that fall in the
    requested split. A longer list starts with the shorter one.
    """
    _validate_problem_arguments(n, seed, split, n_numbers, max_number, max_target)
    rng = random.Random(f"countdown:{seed}:{split}:{n_numbers}:{max_number}:{max_target}")
    problems: list[Problem] = []
    seen: set[tuple[tuple[int, ...], int]] = set()
    max_draws = 100 * n + 1000
    draws = 0

    while len(problems) < n:
        if draws == max_draws:
            raise ValueError(
                f"found only {len(problems)} of n={n} distinct solvable {split} problems in {max_draws} draws "
                f"(n_numbers={n_numbers}, max_number={max_number}, max_target={max_target}); "
                f"lower n or raise max_number or max_target"
            )
        draws += 1

        # Draw the numbers, then a target among those the search can reach.
        numbers = tuple(rng.randint(1, max_number) for _ in range(n_numbers))
        canonical = tuple(sorted(numbers))
        targets = [
            target
            for target in sorted(_reachable(canonical))
            if target <= max_target
            and (canonical, target) not in seen
            and problem_split(Problem(canonical, target)) == split
        ]
        if not targets:
            continue
        target = rng.choice(targets)
        seen.add((canonical, target))
        problems.append(Problem(numbers, target))

    return problems


# -----------------------------------------------------------------------------
# Depth-first search and its trace
#
# A state is a list of numbers. A move takes two of them, a and b with a >= b,
# and replaces them by a+b, a-b, a*b or a/b. Every intermediate stays a
# positive integer: a move is skipped when a-b is not positive or a/b is not
# exact (the usual Countdown convention). Pairs go by position (i < j) and
# the operators in the order + - * /, so the search and its trace are
# deterministic. The reward is broader and accepts any exact rational
# expression.
#
# One trace line per move tried: the indent is the depth, then the move and
# its result, then the numbers left (the untouched ones in order, the result
# last). A move that leaves one number has no list. Unless that number is
# the target, the search backtracks after it. Example for [12 7 3] -> 15:
#
#   12+7=19 [3 19]
#    19+3=22
#    19-3=16
#    19*3=57
#   12-7=5 [3 5]
#    5+3=8
#    5-3=2
#    5*3=15
#   <answer>(12-7)*3</answer><|end|>


_OPERATORS = "+-*/"


def _apply(op: str, a: int, b: int) -> int | None:
    """Return a op b for a >= b, or None when the search's rules skip the move."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a > b else None
    if op == "*":
        return a * b
    return a // b if a % b == 0 else None


def _moves(numbers):
    """Yield (first, second, op, result) for every move from a state, in trace order."""
    for i in range(len(numbers)):
        for j in range(i + 1, len(numbers)):
            first, second = (i, j) if numbers[i] >= numbers[j] else (j, i)
            for op in _OPERATORS:
                result = _apply(op, numbers[first], numbers[second])
                if result is not None:
                    yield first, second, op, result


@functools.lru_cache(maxsize=1 << 14)
def _reachable(numbers: tuple[int, ...]) -> frozenset[int]:
    """Return every value the search reaches using all of `numbers` (a sorted tuple)."""
    if len(numbers) == 1:
        return frozenset(numbers)
    values: set[int] = set()
    for first, second, _, result in _moves(numbers):
        rest = [x for k, x in enumerate(numbers) if k not in (first, second)]
        values |= _reachable(tuple(sorted(rest + [result])))
    return frozenset(values)


def _operand(expression: str) -> str:
    return expression if expression.isdigit() else f"({expression})"


def _depth_first(numbers: list[int], expressions: list[str], target: int, depth: int, lines: list[str]):
    """Search from a state and append one trace line per move tried.

    Returns the expression that reaches the target, or None. expressions[k]
    writes numbers[k] in terms of the original input numbers.
    """
    if len(numbers) == 1:
        return expressions[0] if numbers[0] == target else None

    for first, second, op, result in _moves(numbers):
        untouched = [k for k in range(len(numbers)) if k not in (first, second)]
        state = [numbers[k] for k in untouched] + [result]
        state_expressions = [expressions[k] for k in untouched]
        state_expressions.append(f"{_operand(expressions[first])}{op}{_operand(expressions[second])}")

        line = " " * depth + f"{numbers[first]}{op}{numbers[second]}={result}"
        if len(state) > 1:
            line += f" [{_format_numbers(state)}]"
        lines.append(line)

        answer = _depth_first(state, state_expressions, target, depth + 1, lines)
        if answer is not None:
            return answer
    return None


def _format_numbers(numbers) -> str:
    return " ".join(str(x) for x in numbers)


def _search(numbers, target: int) -> tuple[str | None, list[str]]:
    if not numbers or not all(isinstance(x, int) and x > 0 for x in numbers):
        raise ValueError(f"numbers={numbers!r} is invalid; the search needs at least one positive int")
    lines: list[str] = []
    answer = _depth_first(list(numbers), [str(x) for x in numbers], target, 0, lines)
    return answer, lines


def solve(numbers, target: int) -> str | None:
    """Return the first expression the depth-first search finds, over the original numbers, or None.

    None means that no expression with positive integer intermediates
    exists. A solution through fractions may still exist. Raises ValueError
    unless numbers are positive ints.
    """
    answer, _ = _search(numbers, target)
    return answer


def search_trace(problem: Problem) -> str:
    """Write the depth-first search for a problem as the model's response.

    One line per move tried, then `<answer>EXPR</answer><|end|>` when the
    search reaches the target, or `no solution<|end|>` when it fails. Raises
    ValueError unless the numbers are positive ints.
    """
    answer, lines = _search(problem.numbers, problem.target)
    steps = "".join(line + "\n" for line in lines)
    if answer is None:
        return f"{steps}no solution{STOP}"
    return f"{steps}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}{STOP}"


def trace_length_stats(problems) -> dict:
    """Return the count, median, 90th percentile and max of the trace lengths in tokens.

    Percentiles use the nearest-rank method, so every value is a real trace length.
    """
    lengths = sorted(len(encode(search_trace(problem))) for problem in problems)
    if not lengths:
        raise ValueError("problems is empty; pass at least one problem")

    def nearest_rank(share: float) -> int:
        return lengths[max(math.ceil(share * len(lengths)) - 1, 0)]

    return {"n": len(lengths), "median": nearest_rank(0.5), "p90": nearest_rank(0.9), "max": lengths[-1]}


# -----------------------------------------------------------------------------
# Prompt, answer parser and reward


def format_prompt(problem: Problem, eps: float | None = None) -> str:
    """Write the prompt: <|bos|>, the eviction-rate tag if eps is given, then `[numbers] -> target`.

    The prompt ends with a line break, where the response (the trace) begins.
    """
    tag = "" if eps is None else eps_tag(eps)
    return f"{BOS}{tag}[{_format_numbers(problem.numbers)}] -> {problem.target}\n"


def prompt_tokens(problem: Problem, eps: float | None = None) -> list[int]:
    """Encode format_prompt(problem, eps)."""
    return encode(format_prompt(problem, eps))


def parse_answer(response: str) -> str | None:
    """Return the text of the last complete <answer>...</answer> in a response, or None.

    Pass the response only, never the prompt. The answer starts after the
    last `<answer>` that some `</answer>` follows and ends at the first
    `</answer>` after it. A trailing answer that was never closed is ignored.
    """
    last_close = response.rfind(ANSWER_CLOSE)
    if last_close == -1:
        return None
    start = response.rfind(ANSWER_OPEN, 0, last_close)
    if start == -1:
        return None
    start += len(ANSWER_OPEN)
    return response[start : response.find(ANSWER_CLOSE, start)]


# Bounds that keep the reward fast on any input. A correct answer to a
# generated problem stays far inside them.
MAX_ANSWER_CHARS = 200
MAX_NESTING = 20
MAX_ABS_VALUE = 10**12

_ANSWER_WHITESPACE = " \t\r\n"


class InvalidExpression(ValueError):
    """An answer that is not a well-formed, bounded Countdown expression."""


def _tokenize_expression(text: str) -> list[str]:
    """Split an answer into integer literals and the characters + - * / ( ).

    Only ASCII is accepted: str.isdigit() would also pass digits of other
    scripts, so digits are checked by range.
    """
    tokens = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in _ANSWER_WHITESPACE:
            i += 1
        elif "0" <= char <= "9":
            end = i
            while end < len(text) and "0" <= text[end] <= "9":
                end += 1
            literal = text[i:end]
            if len(literal) > 1 and literal[0] == "0":
                raise InvalidExpression(f"integer literal {literal!r} has a leading zero")
            tokens.append(literal)
            i = end
        elif char in "+-*/()":
            tokens.append(char)
            i += 1
        else:
            raise InvalidExpression(f"character {char!r} is not allowed")
    return tokens


def _bounded(value: Fraction) -> Fraction:
    if abs(value.numerator) >= MAX_ABS_VALUE or value.denominator >= MAX_ABS_VALUE:
        raise InvalidExpression(f"intermediate value {value} exceeds {MAX_ABS_VALUE}")
    return value


class _ExpressionParser:
    """Recursive-descent evaluator over the grammar

        expression := term (("+" | "-") term)*
        term       := factor (("*" | "/") factor)*
        factor     := INTEGER | "(" expression ")"

    in exact rational arithmetic. There is no unary minus or plus.
    """

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.position = 0
        self.nesting = 0
        self.literals: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str | None:
        token = self.peek()
        self.position += 1
        return token

    def parse(self) -> Fraction:
        value = self.expression()
        if self.peek() is not None:
            raise InvalidExpression(f"unexpected {self.peek()!r} at token {self.position}")
        return value

    def expression(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term()
            value = _bounded(value + right if op == "+" else value - right)
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.factor()
            if op == "*":
                value = _bounded(value * right)
            elif right == 0:
                raise InvalidExpression("division by zero")
            else:
                value = _bounded(value / right)
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if token == "(":
            self.nesting += 1
            if self.nesting > MAX_NESTING:
                raise InvalidExpression(f"parentheses nest deeper than {MAX_NESTING}")
            value = self.expression()
            if self.take() != ")":
                raise InvalidExpression("missing ')'")
            self.nesting -= 1
            return value
        if token is not None and token.isdigit():
            value = _bounded(Fraction(int(token)))
            self.literals.append(value.numerator)
            return value
        # Unary minus, a stray operator or the end of input where a number belongs.
        raise InvalidExpression(f"expected an integer or '(' but found {token!r}")


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """Evaluate an answer exactly and return its value and the integer literals it uses.

    Accepts ASCII integer literals without leading zeros, + - * /, parentheses
    and whitespace, and nothing else: no unary minus, no `**`, no names, no
    decimal points. Raises InvalidExpression when the text is longer than
    MAX_ANSWER_CHARS, parentheses nest deeper than MAX_NESTING, a numerator or
    denominator reaches MAX_ABS_VALUE, or a division by zero occurs.
    """
    if len(text) > MAX_ANSWER_CHARS:
        raise InvalidExpression(f"answer has {len(text)} characters, more than {MAX_ANSWER_CHARS}")
    parser = _ExpressionParser(_tokenize_expression(text))
    value = parser.parse()
    return value, parser.literals


def countdown_reward(response: str, numbers: list[int], target: int) -> float:
    """Score a response: 1.0 when its last answer reaches the target using each number once, else 0.0.

    The answer must use the input numbers exactly as a multiset and equal the
    target in exact rational arithmetic, so 7/3 never counts as 2. A missing
    or malformed answer, unary minus, a division by zero or an answer that
    breaks a bound of evaluate_expression scores 0.0. No response string
    makes it raise.
    """
    answer = parse_answer(response)
    if answer is None:
        return 0.0
    try:
        value, literals = evaluate_expression(answer)
    except InvalidExpression:
        return 0.0
    if sorted(literals) != sorted(numbers):
        return 0.0
    return 1.0 if value == target else 0.0


# -----------------------------------------------------------------------------
# AMC/AIME answer checking


def load_math_problems(path) -> list[dict]:
    """Load problems from a JSONL file, one object per line with `problem` and `answer`.

    Blank lines are skipped. `answer` may be a string or an int and is
    returned as a string; other fields are kept. Raises ValueError naming the
    file and line of the first invalid record.
    """
    problems = []
    with Path(path).open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg}); write one JSON object per line") from error
            if not isinstance(record, dict) or not isinstance(record.get("problem"), str):
                raise ValueError(f"{where}: missing string field 'problem'; each line needs 'problem' and 'answer'")
            answer = record.get("answer")
            if isinstance(answer, bool) or not isinstance(answer, (str, int)):
                raise ValueError(f"{where}: field 'answer' is {answer!r}; write it as a string or an int")
            problems.append({**record, "answer": str(answer)})
    return problems


_BOXED = "\\boxed{"


def extract_boxed(response: str) -> str | None:
    """Return the content of the last complete \\boxed{...} in a response, or None.

    Braces nest, and the escaped braces \\{ and \\} do not count. With boxes
    nested in each other, the innermost complete one that starts last wins.
    """
    # Stack of open braces: the content start for a \boxed{ brace, None for any other.
    open_braces: list[int | None] = []
    best_start, best = -1, None
    i = 0
    while i < len(response):
        if response.startswith(_BOXED, i):
            i += len(_BOXED)
            open_braces.append(i)
            continue
        char = response[i]
        if char == "\\" and response[i + 1 : i + 2] in ("{", "}"):
            i += 2
            continue
        if char == "{":
            open_braces.append(None)
        elif char == "}" and open_braces:
            start = open_braces.pop()
            if start is not None and start > best_start:
                best_start, best = start, response[start:i]
        i += 1
    return best


def normalize_math_answer(text: str) -> str:
    """Normalise a math answer for comparison.

    Drops `\\left`, `\\right`, `$` and all whitespace, writes `\\dfrac` and
    `\\tfrac` as `\\frac`, and strips trailing periods. Nothing else changes:
    `0.5` and `\\frac{1}{2}` stay different.
    """
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.replace("$", "")
    text = "".join(text.split())
    return text.rstrip(".")


_ASCII_INTEGER = re.compile(r"[0-9]+")


def math_reward(response: str, answer) -> float:
    """Score a response against a reference answer: 1.0 for a match, else 0.0.

    The last \\boxed{} of the response is the prediction. When the reference
    is an integer from 0 to 999 (an AIME answer), the prediction must be the
    same integer, leading zeros allowed. Otherwise the two must be equal
    after normalize_math_answer.
    """
    predicted = extract_boxed(response)
    if predicted is None:
        return 0.0
    predicted = normalize_math_answer(predicted)
    reference = normalize_math_answer(str(answer))

    if _ASCII_INTEGER.fullmatch(reference) and int(reference) <= 999:
        if not _ASCII_INTEGER.fullmatch(predicted):
            return 0.0
        # Compare without int(): a very long digit string would make int() raise.
        return 1.0 if predicted.lstrip("0") == reference.lstrip("0") else 0.0
    return 1.0 if reference and predicted == reference else 0.0


# -----------------------------------------------------------------------------
# Command line: trace statistics and an example


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print an example Countdown prompt and trace, and trace-length statistics.")
    parser.add_argument("--stats", action="store_true", help="also print the trace-length distribution in tokens")
    parser.add_argument("--n", type=int, default=1000, help="number of problems measured by --stats")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--split", default="train", choices=("train", "test"), help="problem split")
    parser.add_argument("--n-numbers", type=int, default=3, help="input numbers per problem")
    parser.add_argument("--max-number", type=int, default=50, help="largest input number")
    parser.add_argument("--max-target", type=int, default=200, help="largest target")
    args = parser.parse_args(argv)

    settings = dict(split=args.split, n_numbers=args.n_numbers, max_number=args.max_number, max_target=args.max_target)
    example = make_problems(1, args.seed, **settings)[0]
    print(format_prompt(example) + search_trace(example))

    if args.stats:
        stats = trace_length_stats(make_problems(args.n, args.seed, **settings))
        print(f"trace tokens over {stats['n']} problems | median {stats['median']} | p90 {stats['p90']} | max {stats['max']}")


if __name__ == "__main__":
    main()
