"""Deterministic generator of the demo task "contact-card extraction" (sentence -> name/age/city JSON).

Writes SFT chat rows and preference pairs, train and held-out, as JSONL files (see `generate`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from alignpipe.data.formats import write_jsonl

# --- Pools. Train and held-out pools are disjoint (asserted below). All ASCII, no PII. -----------------------
TRAIN_FIRST = """Ana Maria James Wei Fatima Carlos Aiko Olumide Priya Lars Sofia Mateo Chloe Ahmed Ingrid Kenji Amara
Diego Elena Tomasz Nadia Omar Hannah Raj Lucia Pavel Zara Hiroshi Grace Emeka Isabel Nikolai Leila Marco Yuki
Tariq Freya Andre Mei Samuel Ayesha Bruno Clara Dmitri Esther Felipe Gabriela Hassan Irene Jonas Kavya Liam
Mariam Nils Olga Pedro Rosa Stefan Tanvir Ursula Victor Wanjiru Ximena Yusuf Zofia Adele Boris Celine Dorothea
Eduardo Fabio Gemma Henrik Imani Joaquin Katarina Leon Magnus Natalia Orla Patrick Renata Sebastian Teresa Ulrich
Vanessa William Xiomara Yolanda Zoltan Alejandro Birgit Cedric Delphine Enzo Flora Gideon Hedda Ilse Jorge Kirsten
Lorcan Milan Nora Otto Penelope Ramon Sakura Thiago Uri Viktor Wendy Yannick Zuzana Anders Bridget Conor Daphne
Elias Farid Gisela Hamid Ingeborg Joao Kasia Leandro Marisol Nuno Olivia Pablo Rhea Sergio Tamar Ugo Vivian
Wilhelm Yvonne Zubair Agnieszka Bjorn Cormac Dagny Esteban Folake Gunnar Harriet Ishaan Jolene Kaito Ludmila
Matteo Niamh Obinna Pradeep Rebecca Sunita Tomas Valeria Wiktor Zelda Amir Colm Ewa Juno Kai Lola Mira Nico Pia
Rui Tess Vito Wren""".split()
HELDOUT_FIRST = """Beatriz Arjun Chiara Daniel Farah Gustavo Helga Ibrahim Julia Kwame Lena Mohammed Noor Oscar Paula
Quentin Rania Sven Thandiwe Umar Valentina Wojciech Xavier Yara Zeynep Abel Bianca Cyrus Dalia Emil Fiona Goran
Hana Ivan Jasmine Kofi Lorenzo Maya Nathan Ophelia Rafael Selin Tobias Uma Vera Yasmin Zain Alicia Benedikt
Camila Dario Elif Fernando Greta Hugo Ines Jakob Keiko Luca Mirela Nikhil Oona Pilar""".split()
TRAIN_LAST = """Lima Santos Smith Chen Okafor Patel Novak Kowalski Haddad Tanaka Nilsson Garcia Rossi Muller Dubois
Ivanova Mensah Nguyen Kim Fernandes Andersen Costa Yilmaz Khan Moreau Schmidt Silva Ortiz Papadopoulos Jensen
Kaur Bianchi Adeyemi Horvat Lindqvist Murphy O'Brien Sato Herrera Petrov Baker Walsh Romero Ali Dlamini Abara
Bauer Carvalho Delgado Eriksen Fontaine Gallagher Hoffmann Iyer Jovanovic Kuznetsov Lindgren Mwangi Nakamura
Oyelaran Pinto Quispe Rahman Sorensen Takahashi Urbina Varga Wagner Xu Yamamoto Zielinski Acheampong Brennan Cohen
Dimitrov Esposito Falk Gomez Hughes Ibarra Johansson Kozlov Laurent Mendoza Obi Persson Quinn Reyes Steiner Toure
Ueda Vasquez Webb Yadav Zhou Arslan Bertrand Chowdhury Duarte Engel Farouk Greco Holm Ikeda Jaramillo Keller Lund
Molina Novotny Ochoa Pretorius Rocha Sahin Tiwari Uribe Vidal Wojcik Yoon Zamora""".split()
HELDOUT_LAST = """Ferreira Wong Eze Shah Dvorak Nowak Saleh Suzuki Berg Lopez Ricci Weber Lambert Popescu Boateng
Tran Park Almeida Hansen Moreno Aydin Hussain Girard Fischer Pereira Vargas Nikolaidis Larsen Singh Marino
Owusu Kovac Sandberg Kelly Fitzgerald Ito Castillo Volkov Carter Byrne Navarro Ahmadi Zulu Mahlangu""".split()
TRAIN_CITIES = [c.strip() for c in """Porto, Lisbon, San Diego, Kuala Lumpur, Toronto, Nairobi, Osaka, Krakow,
Melbourne, Austin, Lyon, Bogota, Cape Town, Hamburg, Seattle, Mumbai, Buenos Aires, Oslo, Dublin, Hanoi,
Marseille, Vancouver, Lagos, Seville, Denver, Auckland, Istanbul, Manila, Edinburgh, Prague, Santiago, Chicago,
Helsinki, Accra, Bangkok, Valencia, Rio de Janeiro, Cairo, Montreal, Perth, Salt Lake City, Hong Kong, Geneva,
Bristol, Leeds, Antwerp, Utrecht, Bordeaux, Florence, Bologna, Zurich, Copenhagen, Warsaw, Bucharest, Belgrade,
Zagreb, Ljubljana, Vilnius, Tallinn, Ankara, Doha, Muscat, Lahore, Pune, Kolkata, Colombo, Kathmandu, Chengdu,
Shanghai, Busan, Sapporo, Fukuoka, Adelaide, Hobart, Christchurch, Havana, San Juan, Guadalajara, Monterrey,
Medellin, Caracas, La Paz, Asuncion, Rosario, Recife, Fortaleza, Luanda, Harare, Kigali, Abuja, Tunis, Algiers,
Halifax, Ottawa, Winnipeg, Portland, Atlanta, Miami, Dallas, Houston, Nashville, Detroit, Pittsburgh, Minneapolis,
Anchorage, Honolulu, Panama City, Quebec City, Las Vegas, Los Angeles, Kansas City, Tel Aviv, Abu Dhabi,
Santo Domingo, San Sebastian, Saint Petersburg, New Delhi, Kota Kinabalu, Port Louis""".split(",")]
HELDOUT_CITIES = [c.strip() for c in """Boston, Madrid, Kyoto, Nantes, Rotterdam, Calgary, Quito, Casablanca,
Sydney, Phoenix, Munich, Bilbao, Gdansk, Kampala, Dhaka, Jakarta, Ho Chi Minh City, New Orleans, San Francisco,
Mexico City, Addis Ababa, Tbilisi, Reykjavik, Stockholm, Vienna, Budapest, Athens, Naples, Turin, Glasgow,
Cardiff, Brisbane, Wellington, Montevideo, Cordoba, Dakar, Lusaka, Seoul, Taipei, Chennai, Karachi, Riga""".split(",")]

# Distractor fillers, shared by both splits (they never end up in a target).
JOBS = """nurse carpenter teacher electrician architect baker pharmacist librarian translator photographer chef
accountant veterinarian plumber journalist dentist mechanic engineer gardener paramedic""".split()
PETS = "dog cat parrot rabbit tortoise hamster beagle terrier goldfish iguana".split()
PET_NAMES = "Biscuit Pepper Mochi Noodle Pickles Waffles Ziggy Bean Sprout Pumpkin Nugget Muffin".split()
HOBBIES = ["hiking", "playing chess", "baking bread", "cycling", "painting", "birdwatching", "playing the cello",
           "rock climbing", "gardening", "swimming", "knitting", "fishing", "running", "pottery"]
STREETS = ["Mill Lane", "Harbour Road", "Oak Avenue", "Church Street", "Station Road", "Park Lane",
           "Maple Drive", "King Street", "Garden Row", "Bridge Street"]
MONTHS = "January February March April May June July August September October November December".split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
TRANSPORT = "bus tram train ferry metro".split()
KIDS = "two three four five".split()

# Templates: every one names {name}, {age} and {city}; the rest are distractors.
TRAIN_TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, {a_age}-year-old {job} from {city}.",
    "Living in {city} since {year}, {name} is now {age} and works as {a_job}.",
    "At {age}, {name} works as {a_job} in {city}, though they were originally from {other_city}.",
    "{city} resident {name}, {age}, owns {a_pet} named {pet_name}.",
    "Our newest volunteer is {name} ({age}), who lives at {street} in {city}.",
    "{name}, aged {age}, moved from {other_city} to {city} in {year}.",
    "The {age}-year-old {name} has been {a_job} in {city} for {years} years.",
    "Originally from {other_city}, {name} now lives in {city} and is {age}.",
    "{name} celebrated turning {age} on {month} {day} at home in {city}.",
    "Age {age}. Home: {city}. That's {name}, who enjoys {hobby}.",
    "In {city}, {name} ({age}) spends most weekends {hobby}.",
    "{name} just turned {age} and shares a flat in {city} with {a_pet}.",
    "Having grown up in {other_city}, {age}-year-old {name} settled in {city} in {year}.",
    "{name} from {city} is {age} and has {kids} kids.",
    "Please note: {name}, {age}, is currently based in {city}, apartment {flat}.",
    "We spoke with {name} last {weekday}; the {age}-year-old lives in {city} and works as {a_job}.",
    "{city} is home to {name}, who is {age} years old and keeps {a_pet}.",
    "Born in {other_city} but living in {city}, {name} is {age} today.",
    "{name} ({age}, {city}) signed up for the {year} marathon.",
    "Record: {name} is {a_age}-year-old {job} currently living in {city}.",
    "After {years} years in {other_city}, {name} relocated to {city} and is now {age}.",
    "{name}, who is {age}, rents a room near {street} in {city}.",
    "Sign-up sheet entry: {name}. Age: {age}. City: {city}. Notes: has {a_pet}.",
    "{age} years old and living in {city}, {name} spends free time {hobby}.",
    "The tenant at {street}, {city}, is {name}, age {age}.",
    "Last {month}, {name} ({age}) visited {other_city} before flying back home to {city}.",
    "{name} is {a_job} in {city}, is {age} years old, and started the job in {year}.",
    "Our {job} of the month is {name}, {age}, from {city}.",
    "Quick intro: I'm {name}, I'm {age}, and I live in {city} with {a_pet} called {pet_name}.",
    "{name} ({age}) has lived in {city} for {years} years and commutes to work by {transport}.",
    "Every {weekday}, {age}-year-old {name} takes the {transport} across {city}, where they have lived since {year}.",
    # Second city before or after the real one, in many wordings: the commonest held-out failure is copying it.
    "{name} grew up in {other_city} and, at {age}, now lives in {city}.",
    "Former {other_city} resident {name} ({age}) now has a home in {city}.",
    "Birthplace: {other_city}. Current city: {city}. Name: {name}. Age: {age}.",
    "Name: {name} | Age: {age} | Lives in: {city} | Hometown: {other_city}",
    "{name} left {other_city} {years} years ago and, now {age}, lives in {city}.",
    "Spotted at the airport in {other_city}: {name}, {age}, on the way home to {city}.",
    "{name} commutes to {other_city} for work but lives in {city}; {age} years old.",
    "Though born in {other_city}, {name} has lived in {city} for {years} years and is {age}.",
    "{age}, {job}, lives in {city}: that sums up {name}.",
    "New member: {name}, {age}, of {city} (previously {other_city}).",
    "Yesterday {name} flew from {other_city} back to {city}, where the {age}-year-old lives.",
    "Home is {city} for {name}, {age}, who studied in {other_city} in {year}.",
    "{name}, {age}, lives in {city} and visits family in {other_city} every {month}.",
    "{name} ({age}) moved to {city} after {years} years in {other_city}.",
    "Current address: {street}, {city}. Resident: {name}, {age}. Former address: {other_city}.",
    "We met {name} on a trip to {other_city}; the {age}-year-old {job} actually lives in {city}.",
    "{name}'s {pet} {pet_name} lives with them in {city}; {name} is {age}.",
    "Hometown {other_city}, now living in {city}: {name}, age {age}, {a_job}.",
    "Registered on {month} {day}: {name}, aged {age}, resident of {city}.",
    "{name} is {age}. {name} lives in {city}. {name} likes {hobby}.",
    "Passenger {name} ({age}) took the {transport} from {other_city} to home in {city}.",
    "As of {year}, {name} lives in {city}; they were {age} at their last birthday.",
    "{name}, a {job} aged {age}, lives in {city}, having worked in {other_city} before.",
    "From {city}: {name}, {age} years old, {kids} kids, works as {a_job}.",
]
HELDOUT_TEMPLATES = [
    "This is {name}; {age} years of age; currently residing in {city}.",
    "Although {name} spent childhood in {other_city}, the {age}-year-old calls {city} home today.",
    "Contact on file: {name}, {age}, {city}.",
    "{city} has a new library volunteer: {name}, who is {age} and used to work as {a_job}.",
    "Ask {name} about {hobby}; at {age}, they still do it every week near home in {city}.",
    "Profile summary: lives in {city}, was born in {other_city}, is {age}, goes by {name}.",
    "{name} has {a_pet} named {pet_name}, is {age} years old, and has rented a flat in {city} since {year}.",
    "Having turned {age} on {month} {day}, {name} threw a party at their place in {city}.",
    "Residence: {city}; full name: {name}; age in years: {age}; previous city: {other_city}.",
    "When {name} isn't working as {a_job} in {city}, the {age}-year-old enjoys {hobby}.",
    "I ran into {name} at the station in {other_city}; they're {age} and were heading back home to {city}.",
    "{age}-year-old {name} of {city} won the {year} chess tournament held at {street}.",
    "Recently, {name} bought a house in {city} at the age of {age}, {years} years after leaving {other_city}.",
    "Everyone in {city} knows {name}, the {age}-year-old who walks {a_pet} past {street} each morning.",
]

for _train, _heldout in [(TRAIN_FIRST, HELDOUT_FIRST), (TRAIN_LAST, HELDOUT_LAST),
                         (TRAIN_CITIES, HELDOUT_CITIES), (TRAIN_TEMPLATES, HELDOUT_TEMPLATES)]:
    assert not set(_train) & set(_heldout), "train and held-out pools must be disjoint"

KEYS = ("name", "age", "city")
FAILURE_KINDS = ("wrong_value", "missing_key", "age_as_string", "prose_wrapped", "code_fence", "wrong_key_order")
PROSE_PREFIXES = ["Sure! Here is the contact card: ", "Here's the extracted information: ",
                  "Of course. The details are: ", "Certainly! I found the following: ", "The contact card is "]
PROSE_SUFFIXES = ["", "", " Let me know if you need anything else.", " Hope this helps!"]


@dataclass(frozen=True)
class Pools:
    """One split's pools of first names, last names, cities and sentence templates."""

    first: list[str]
    last: list[str]
    cities: list[str]
    templates: list[str]


TRAIN = Pools(TRAIN_FIRST, TRAIN_LAST, TRAIN_CITIES, TRAIN_TEMPLATES)
HELDOUT = Pools(HELDOUT_FIRST, HELDOUT_LAST, HELDOUT_CITIES, HELDOUT_TEMPLATES)


@dataclass(frozen=True)
class Example:
    """One generated sentence with its ground truth and the distractor city it mentions, if any."""

    sentence: str
    name: str
    age: int
    city: str
    other_city: str | None


def contact_card(name: str, age: int, city: str) -> str:
    """Return the exact target string, e.g. `{"name": "Ana Lima", "age": 34, "city": "Porto"}`.

    Args:
        name: Full name as written in the sentence.
        age: Age in years.
        city: City the person lives in.

    Returns:
        `json.dumps` of the dict with keys name, age, city in that order (default separators).
    """
    return json.dumps({"name": name, "age": age, "city": city})


def _article(word: str) -> str:
    """Return `a word` or `an word` (digits are read aloud: 18 and 80-89 take `an`)."""
    if word[0].isdigit():
        return ("an " if word.startswith("8") or word.startswith("18") else "a ") + word
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _normalize(sentence: str) -> str:
    """Lowercase and collapse whitespace: the key for duplicate checks."""
    return " ".join(sentence.lower().split())


def _example(rng: random.Random, pools: Pools) -> Example:
    """Draw one example from `pools`."""
    first, last = rng.choice(pools.first), rng.choice(pools.last)
    middle = f" {rng.choice('ABCDEFGHJKLMNPRSTVW')}." if rng.random() < 0.1 else ""
    name = f"{first}{middle} {last}"
    age = rng.randint(18, 90)
    city, other_city = rng.sample(pools.cities, 2)
    template = rng.choice(pools.templates)
    job, pet = rng.choice(JOBS), rng.choice(PETS)
    sentence = template.format(
        name=name, age=age, city=city, other_city=other_city, a_age=_article(str(age)),
        job=job, a_job=_article(job), pet=pet, a_pet=_article(pet), pet_name=rng.choice(PET_NAMES),
        hobby=rng.choice(HOBBIES), street=f"{rng.randint(2, 300)} {rng.choice(STREETS)}",
        flat=rng.randint(1, 60), year=rng.randint(1998, 2023), years=rng.randint(2, min(age - 3, 30)),
        month=rng.choice(MONTHS), day=rng.randint(1, 28), weekday=rng.choice(WEEKDAYS),
        transport=rng.choice(TRANSPORT), kids=rng.choice(KIDS),
    )
    return Example(sentence, name, age, city, other_city if "{other_city}" in template else None)


def _draw(rng: random.Random, pools: Pools, n: int, seen: set[str], forbidden: set[str]) -> list[Example]:
    """Draw `n` examples whose normalized sentences are neither in `seen` nor in `forbidden`; update `seen`."""
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} unique sentences from the pools")
        ex = _example(rng, pools)
        key = _normalize(ex.sentence)
        if key in seen or key in forbidden:
            continue  # collision: regenerate
        seen.add(key)
        out.append(ex)
    return out


def _misspell(rng: random.Random, name: str) -> str:
    """Return a shortened or misspelt variant of `name` that differs from it."""
    parts = name.split()
    first, last = parts[0], parts[-1]
    choice = rng.randrange(3)
    if choice == 0:
        wrong = first  # last name dropped
    elif choice == 1 and len(last) > 3:
        i = rng.randrange(1, len(last) - 1)
        wrong = " ".join(parts[:-1] + [last[:i] + last[i + 1:]])  # one letter dropped
    else:
        i = rng.randrange(1, len(first) - 1)
        wrong = " ".join([first[:i] + first[i + 1] + first[i] + first[i + 2:]] + parts[1:])  # letters swapped
    return wrong if wrong != name else first


def _rejected(rng: random.Random, ex: Example, kind: str, pools: Pools) -> str:
    """Build a realistic failed answer of the given `kind` for `ex`."""
    card = {"name": ex.name, "age": ex.age, "city": ex.city}
    if kind == "wrong_value":
        field = rng.choice(KEYS)
        if field == "age":
            card["age"] = ex.age + rng.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5])
        elif field == "city":
            card["city"] = ex.other_city or rng.choice([c for c in pools.cities if c != ex.city])
        else:
            card["name"] = _misspell(rng, ex.name)
        return json.dumps(card)
    if kind == "missing_key":
        dropped = rng.choice(KEYS)
        return json.dumps({k: v for k, v in card.items() if k != dropped})
    if kind == "age_as_string":
        return json.dumps({**card, "age": str(ex.age)})
    if kind == "prose_wrapped":
        return rng.choice(PROSE_PREFIXES) + json.dumps(card) + rng.choice(PROSE_SUFFIXES)
    if kind == "code_fence":
        return "```json\n" + json.dumps(card) + "\n```"
    if kind == "wrong_key_order":
        order = rng.choice([p for p in itertools.permutations(KEYS) if p != KEYS])
        return json.dumps({k: card[k] for k in order})
    raise ValueError(f"unknown failure kind {kind!r}")


def _sft_row(ex: Example) -> dict:
    """Chat-messages SFT row (no system turn: the pipeline config adds one)."""
    return {"messages": [{"role": "user", "content": ex.sentence},
                         {"role": "assistant", "content": contact_card(ex.name, ex.age, ex.city)}]}


def _pref_rows(rng: random.Random, examples: list[Example], pools: Pools) -> list[dict]:
    """Preference rows; failure kinds cycle in freshly shuffled rounds so each kind appears evenly."""
    rows, kinds = [], []
    for ex in examples:
        if not kinds:
            kinds = list(FAILURE_KINDS)
            rng.shuffle(kinds)
        chosen = contact_card(ex.name, ex.age, ex.city)
        rejected = _rejected(rng, ex, kinds.pop(), pools)
        assert rejected != chosen
        rows.append({"prompt": [{"role": "user", "content": ex.sentence}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def generate(out_dir: str | Path, n_train: int = 1200, n_heldout: int = 400, n_pref_train: int = 600,
             n_pref_heldout: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write sft_train.jsonl, sft_heldout.jsonl, pref_train.jsonl, pref_heldout.jsonl into out_dir; return name->path.

    Train files draw on the train pools and held-out files on the disjoint held-out pools. Every sentence is
    unique within its split (SFT and preference rows together), and no held-out sentence equals a train one.

    Args:
        out_dir: Directory to write into (created if missing).
        n_train: SFT training rows.
        n_heldout: SFT held-out rows.
        n_pref_train: Preference rows from the train pools.
        n_pref_heldout: Preference rows from the held-out pools.
        seed: Seed of the single `random.Random` stream; the same seed gives byte-identical files.

    Returns:
        Mapping of file stem (e.g. `"sft_train"`) to the written path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train_seen: set[str] = set()
    sft_train = _draw(rng, TRAIN, n_train, train_seen, set())
    pref_train = _draw(rng, TRAIN, n_pref_train, train_seen, set())
    heldout_seen: set[str] = set()
    sft_heldout = _draw(rng, HELDOUT, n_heldout, heldout_seen, train_seen)
    pref_heldout = _draw(rng, HELDOUT, n_pref_heldout, heldout_seen, train_seen)
    rows = {
        "sft_train": [_sft_row(ex) for ex in sft_train],
        "sft_heldout": [_sft_row(ex) for ex in sft_heldout],
        "pref_train": _pref_rows(rng, pref_train, TRAIN),
        "pref_heldout": _pref_rows(rng, pref_heldout, HELDOUT),
    }
    paths = {}
    for name, split_rows in rows.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(split_rows, paths[name])
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m alignpipe.data.demo --out data/demo --seed 0`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    for name, path in generate(args.out, seed=args.seed).items():
        with path.open(encoding="utf-8") as f:
            print(f"{name}: {sum(1 for _ in f)} rows -> {path}")


if __name__ == "__main__":
    main()
