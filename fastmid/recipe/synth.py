"""Deterministic generator of fastmid's bundled GSM8K-style data.

Multi-step arithmetic word problems (shopping, rates, sharing, ages, savings, baking,
collections, travel) with 1–4 steps. Answers are short chain-of-thought lines, one
calculation per line, ending ``#### N`` like GSM8K. Numbers stay small so that a 135M-parameter
model can learn the format and most of the arithmetic after a few minutes of tuning.

``python -m fastmid.recipe.synth`` rewrites ``fastmid/resources/gsm_{train,test}.jsonl``; the output
depends only on the seeds, so the shipped files are reproducible byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from fastmid.fileio import write_text_atomic

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
TRAIN_SIZE = 2000
TEST_SIZE = 200
TRAIN_SEED = 1234
TEST_SEED = 5678

NAMES = [
    "Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena",
    "Milo", "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Zoe",
]  # fmt: skip
ITEMS = [
    ("apple", "apples"), ("pencil", "pencils"), ("notebook", "notebooks"), ("orange", "oranges"),
    ("sticker", "stickers"), ("cookie", "cookies"), ("marble", "marbles"), ("card", "cards"),
    ("balloon", "balloons"), ("muffin", "muffins"), ("ribbon", "ribbons"), ("candle", "candles"),
]  # fmt: skip

Problem = tuple[str, list[str], int]


def _steps(rng: random.Random) -> int:
    # Weighted towards 2-3 steps, like most GSM8K problems, with some 1- and 4-step ones.
    return rng.choices([1, 2, 3, 4], weights=[2, 4, 3, 2])[0]


def _shopping(rng: random.Random, n: int) -> Problem:
    name = rng.choice(NAMES)
    kinds = rng.sample(ITEMS, 2)
    a, pa = rng.randint(2, 9), rng.randint(2, 9)
    b, pb = rng.randint(2, 9), rng.randint(1, 6)
    ca = a * pa
    q = f"{name} buys {a} {kinds[0][1]} for ${pa} each."
    lines = [f"The {kinds[0][1]} cost {a} * {pa} = {ca} dollars."]
    total = ca
    if n >= 2:
        q += f" {name} also buys {b} {kinds[1][1]} for ${pb} each."
        cb = b * pb
        lines.append(f"The {kinds[1][1]} cost {b} * {pb} = {cb} dollars.")
        lines.append(f"In total {name} spends {ca} + {cb} = {ca + cb} dollars.")
        total = ca + cb
    if n >= 3:
        paid = (total // 10 + 1 + rng.randint(0, 3)) * 10
        q += f" {name} pays with ${paid}."
        lines.append(f"The change is {paid} - {total} = {paid - total} dollars.")
        q += " How much change does " + name + " get?"
        total = paid - total
        if n >= 4:
            q = q.replace(" How much change does " + name + " get?", "")
            saved = rng.randint(2, 20)
            q += f" {name} already had ${saved} saved."
            q += f" How much money does {name} have after shopping?"
            lines.append(f"{name} now has {total} + {saved} = {total + saved} dollars.")
            total += saved
    else:
        q += f" How much does {name} spend?"
    return q, lines, total


def _rates(rng: random.Random, n: int) -> Problem:
    name = rng.choice(NAMES)
    rate, hours = rng.randint(5, 15), rng.randint(2, 8)
    earned = rate * hours
    q = f"{name} earns ${rate} per hour and works {hours} hours on Monday."
    lines = [f"On Monday {name} earns {rate} * {hours} = {earned} dollars."]
    total = earned
    if n >= 2:
        hours2 = rng.randint(2, 8)
        e2 = rate * hours2
        q += f" On Tuesday {name} works {hours2} hours."
        lines.append(f"On Tuesday {name} earns {rate} * {hours2} = {e2} dollars.")
        lines.append(f"Together that is {earned} + {e2} = {earned + e2} dollars.")
        total = earned + e2
    if n >= 3:
        spent = rng.randint(5, total - 1)
        q += f" {name} spends ${spent} on lunch."
        lines.append(f"After lunch {name} has {total} - {spent} = {total - spent} dollars.")
        total -= spent
    if n >= 4:
        bonus = rng.randint(2, 5)
        q += f" Then {name}'s savings are multiplied by {bonus} by a prize."
        lines.append(f"With the prize {name} has {total} * {bonus} = {total * bonus} dollars.")
        total *= bonus
    q += f" How many dollars does {name} have?" if n >= 3 else f" How much does {name} earn?"
    return q, lines, total


def _sharing(rng: random.Random, n: int) -> Problem:
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)[1]
    friends = rng.randint(2, 6)
    each = rng.randint(2, 9)
    total = friends * each
    if n == 1:
        q = f"{name} shares {total} {item} equally among {friends} friends."
        q += " How many does each friend get?"
        return q, [f"Each friend gets {total} / {friends} = {each} {item}."], each
    boxes = rng.randint(2, 5)
    per_box = rng.randint(3, 9)
    start = boxes * per_box
    extra = total - start
    while extra <= 0:
        each += 1
        total = friends * each
        extra = total - start
    q = f"{name} has {boxes} boxes with {per_box} {item} in each box and finds {extra} more."
    lines = [
        f"The boxes hold {boxes} * {per_box} = {start} {item}.",
        f"With the extra {item} there are {start} + {extra} = {total} {item}.",
    ]
    answer = each
    q += f" {name} shares them equally among {friends} friends."
    lines.append(f"Each friend gets {total} / {friends} = {each} {item}.")
    if n >= 3:
        eaten = rng.randint(1, each - 1) if each > 1 else 0
        q += f" Each friend then gives away {eaten}."
        lines.append(f"Each friend keeps {each} - {eaten} = {each - eaten} {item}.")
        answer = each - eaten
    if n >= 4:
        lines.append(f"All friends keep {friends} * {answer} = {friends * answer} {item}.")
        answer = friends * answer
        q += f" How many {item} do the friends keep in total?"
    elif n >= 3:
        q += " How many does each friend keep?"
    else:
        q += " How many does each friend get?"
    return q, lines, answer


def _ages(rng: random.Random, n: int) -> Problem:
    a, b, c = rng.sample(NAMES, 3)
    age_a = rng.randint(5, 15)
    diff = rng.randint(2, 9)
    age_b = age_a + diff
    q = f"{a} is {age_a} years old. {b} is {diff} years older than {a}."
    lines = [f"{b} is {age_a} + {diff} = {age_b} years old."]
    if n == 1:
        return q + f" How old is {b}?", lines, age_b
    k = rng.randint(2, 3)
    age_c = age_b * k
    q += f" {c} is {k} times as old as {b}."
    lines.append(f"{c} is {age_b} * {k} = {age_c} years old.")
    if n == 2:
        return q + f" How old is {c}?", lines, age_c
    years = rng.randint(2, 10)
    later_c = age_c + years
    lines.append(f"In {years} years {c} will be {age_c} + {years} = {later_c} years old.")
    if n == 3:
        return q + f" How old will {c} be in {years} years?", lines, later_c
    later_a = age_a + years
    lines.append(f"In {years} years {a} will be {age_a} + {years} = {later_a} years old.")
    lines.append(f"Together they will be {later_c} + {later_a} = {later_c + later_a} years old.")
    q += f" What will the sum of the ages of {c} and {a} be in {years} years?"
    return q, lines, later_c + later_a


def _savings(rng: random.Random, n: int) -> Problem:
    name = rng.choice(NAMES)
    weekly = rng.randint(3, 12)
    weeks = rng.randint(2, 9)
    saved = weekly * weeks
    q = f"{name} saves ${weekly} every week for {weeks} weeks."
    lines = [f"{name} saves {weekly} * {weeks} = {saved} dollars."]
    answer = saved
    if n >= 2:
        gift = rng.randint(5, 30)
        q += f" A grandparent adds ${gift}."
        lines.append(f"With the gift {name} has {saved} + {gift} = {saved + gift} dollars.")
        answer = saved + gift
    if n >= 3:
        price = rng.randint(10, answer - 1)
        if n >= 4 and (answer - price) % 2:
            price -= 1  # an even rest can always be split into halves below
        q += f" {name} buys a game for ${price}."
        lines.append(f"After the game {name} has {answer} - {price} = {answer - price} dollars.")
        answer -= price
    if n >= 4:
        parts = rng.choice([d for d in (2, 3, 4, 5) if answer % d == 0])
        q += f" {name} gives 1/{parts} of the rest to a sister."
        kept = answer - answer // parts
        lines.append(f"The sister gets {answer} / {parts} = {answer // parts} dollars.")
        lines.append(f"{name} keeps {answer} - {answer // parts} = {kept} dollars.")
        answer = kept
    q += f" How much money does {name} have now?" if n >= 2 else f" How much does {name} save?"
    return q, lines, answer


def _baking(rng: random.Random, n: int) -> Problem:
    name = rng.choice(NAMES)
    trays = rng.randint(2, 6)
    per_tray = rng.randint(4, 12)
    baked = trays * per_tray
    q = f"{name} bakes {trays} trays of muffins with {per_tray} muffins on each tray."
    lines = [f"{name} bakes {trays} * {per_tray} = {baked} muffins."]
    answer = baked
    if n >= 2:
        sold = rng.randint(1, baked - 1)
        q += f" {name} sells {sold} muffins."
        lines.append(f"{baked} - {sold} = {baked - sold} muffins are left.")
        answer = baked - sold
    if n >= 3:
        more = rng.randint(2, 15)
        q += f" Then {name} bakes {more} more."
        lines.append(f"Now there are {answer} + {more} = {answer + more} muffins.")
        answer += more
    if n >= 4:
        price = rng.randint(2, 4)
        q += f" {name} sells all of them for ${price} each."
        lines.append(f"They sell for {answer} * {price} = {answer * price} dollars.")
        answer *= price
        q += " How many dollars does " + name + " get?"
    else:
        q += " How many muffins are there?" if n >= 2 else " How many muffins does it make?"
    return q, lines, answer


def _collection(rng: random.Random, n: int) -> Problem:
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)[1]
    x = rng.randint(10, 60)
    q = f"{a} has {x} {item}."
    more = rng.randint(3, 20)
    lines = [f"{b} has {x} + {more} = {x + more} {item}."]
    q += f" {b} has {more} more {item} than {a}."
    answer = x + more
    if n >= 2:
        lines.append(f"Together they have {x} + {answer} = {x + answer} {item}.")
        answer = x + answer
    if n >= 3:
        lost = rng.randint(1, 9)
        q += f" They lose {lost} {item}."
        lines.append(f"After losing some they have {answer} - {lost} = {answer - lost} {item}.")
        answer -= lost
    if n >= 4:
        k = rng.randint(2, 3)
        q += f" Then their collection grows to {k} times its size."
        lines.append(f"The collection becomes {answer} * {k} = {answer * k} {item}.")
        answer *= k
    q += f" How many {item} do they have?" if n >= 2 else f" How many {item} does {b} have?"
    return q, lines, answer


def _travel(rng: random.Random, n: int) -> Problem:
    name = rng.choice(NAMES)
    speed = rng.randint(3, 12) * 5
    hours = rng.randint(2, 6)
    dist = speed * hours
    q = f"{name} drives at {speed} miles per hour for {hours} hours."
    lines = [f"{name} drives {speed} * {hours} = {dist} miles."]
    answer = dist
    if n >= 2:
        extra = rng.randint(5, 40)
        q += f" Then {name} drives {extra} more miles."
        lines.append(f"The trip is {dist} + {extra} = {dist + extra} miles.")
        answer = dist + extra
    if n >= 3:
        lines.append(f"The round trip is {answer} * 2 = {answer * 2} miles.")
        answer *= 2
        q += f" {name} drives back the same way."
    if n >= 4:
        done = rng.randint(10, answer - 1)
        q += f" So far {name} has driven {done} miles of the round trip."
        lines.append(f"{name} still has {answer} - {done} = {answer - done} miles to go.")
        answer -= done
        q += " How many miles are left?"
    else:
        q += " How many miles does " + name + " drive in total?"
    return q, lines, answer


TEMPLATES: list[Callable[[random.Random, int], Problem]] = [
    _shopping, _rates, _sharing, _ages, _savings, _baking, _collection, _travel,
]  # fmt: skip


def make_problem(rng: random.Random) -> dict[str, str]:
    """One ``{"question", "answer"}`` record; the answer ends ``#### N``."""
    template = rng.choice(TEMPLATES)
    question, lines, answer = template(rng, _steps(rng))
    return {"question": question, "answer": "\n".join([*lines, f"#### {answer}"])}


def generate(n: int, seed: int, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """``n`` distinct problems from ``seed``, skipping questions in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[dict[str, str]] = []
    while len(out) < n:
        record = make_problem(rng)
        if record["question"] in seen:
            continue
        seen.add(record["question"])
        out.append(record)
    return out


def splits(
    train_seed: int = TRAIN_SEED, test_seed: int = TEST_SEED
) -> dict[str, list[dict[str, str]]]:
    """Train and test splits (test questions never appear in train); the default seeds give
    the bundled ones, other seeds a fresh set that played no part in any choice made on them."""
    train = generate(TRAIN_SIZE, train_seed)
    test = generate(TEST_SIZE, test_seed, exclude={r["question"] for r in train})
    return {"train": train, "test": test}


def write_jsonl(records: list[dict[str, str]], path: Path) -> None:
    """Write ``records`` one JSON object per line, atomically."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(path, text)


def main(argv: list[str] | None = None) -> int:
    """Regenerate the bundled splits into ``--out`` (default: the package's resources)."""
    parser = argparse.ArgumentParser(prog="python -m fastmid.recipe.synth", description=__doc__)
    parser.add_argument("--out", type=Path, default=RESOURCES, help="output directory")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs=2,
        default=(TRAIN_SEED, TEST_SEED),
        metavar=("TRAIN", "TEST"),
        help="generator seeds of the two splits; other seeds make a second, independent set "
        f"(default: {TRAIN_SEED} {TEST_SEED}, the bundled one)",
    )
    args = parser.parse_args(argv)
    for split, records in splits(*args.seeds).items():
        write_jsonl(records, args.out / f"gsm_{split}.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
