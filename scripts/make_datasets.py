#!/usr/bin/env python3
"""Generate the small fact datasets that ship inside tunelab.

Writes into ``src/tunelab/resources/data/``:

* ``facts_instruct.jsonl``    -- alpaca-format instruction examples (instruction/input/output)
* ``facts_corpus.jsonl``      -- short encyclopedic paragraphs for continued pretraining ({"text"})
* ``facts_preferences.jsonl`` -- preference pairs (prompt/chosen/rejected) for reward modelling

Standard library only and fully deterministic: a fixed seed, no set iteration, no
timestamps, so two runs produce byte-identical files.

    python scripts/make_datasets.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

SEED = 20240611
N_PER_TASK = 172  # instruct examples per task (7 tasks -> ~1200 rows)

# --------------------------------------------------------------------------------------
# Fact tables (hand-written; conventional English names)
# --------------------------------------------------------------------------------------

AF, AS, EU, NA, SA, OC = "Africa", "Asia", "Europe", "North America", "South America", "Oceania"

# (country as used mid-sentence, capital, continent or None when it spans two continents)
COUNTRIES: list[tuple[str, str, str | None]] = [
    # Africa
    ("Algeria", "Algiers", AF),
    ("Angola", "Luanda", AF),
    ("Botswana", "Gaborone", AF),
    ("Burkina Faso", "Ouagadougou", AF),
    ("Burundi", "Gitega", AF),
    ("Cameroon", "Yaoundé", AF),
    ("Cape Verde", "Praia", AF),
    ("the Central African Republic", "Bangui", AF),
    ("Chad", "N'Djamena", AF),
    ("Comoros", "Moroni", AF),
    ("the Democratic Republic of the Congo", "Kinshasa", AF),
    ("the Republic of the Congo", "Brazzaville", AF),
    ("Djibouti", "Djibouti", AF),
    ("Egypt", "Cairo", AF),
    ("Equatorial Guinea", "Malabo", AF),
    ("Eritrea", "Asmara", AF),
    ("Ethiopia", "Addis Ababa", AF),
    ("Gabon", "Libreville", AF),
    ("the Gambia", "Banjul", AF),
    ("Ghana", "Accra", AF),
    ("Guinea", "Conakry", AF),
    ("Guinea-Bissau", "Bissau", AF),
    ("Kenya", "Nairobi", AF),
    ("Lesotho", "Maseru", AF),
    ("Liberia", "Monrovia", AF),
    ("Libya", "Tripoli", AF),
    ("Madagascar", "Antananarivo", AF),
    ("Malawi", "Lilongwe", AF),
    ("Mali", "Bamako", AF),
    ("Mauritania", "Nouakchott", AF),
    ("Mauritius", "Port Louis", AF),
    ("Morocco", "Rabat", AF),
    ("Mozambique", "Maputo", AF),
    ("Namibia", "Windhoek", AF),
    ("Niger", "Niamey", AF),
    ("Nigeria", "Abuja", AF),
    ("Rwanda", "Kigali", AF),
    ("São Tomé and Príncipe", "São Tomé", AF),
    ("Senegal", "Dakar", AF),
    ("Seychelles", "Victoria", AF),
    ("Sierra Leone", "Freetown", AF),
    ("Somalia", "Mogadishu", AF),
    ("South Sudan", "Juba", AF),
    ("Sudan", "Khartoum", AF),
    ("Tanzania", "Dodoma", AF),
    ("Togo", "Lomé", AF),
    ("Tunisia", "Tunis", AF),
    ("Uganda", "Kampala", AF),
    ("Zambia", "Lusaka", AF),
    ("Zimbabwe", "Harare", AF),
    # Asia
    ("Afghanistan", "Kabul", AS),
    ("Bahrain", "Manama", AS),
    ("Bangladesh", "Dhaka", AS),
    ("Bhutan", "Thimphu", AS),
    ("Brunei", "Bandar Seri Begawan", AS),
    ("Cambodia", "Phnom Penh", AS),
    ("China", "Beijing", AS),
    ("India", "New Delhi", AS),
    ("Indonesia", "Jakarta", AS),
    ("Iran", "Tehran", AS),
    ("Iraq", "Baghdad", AS),
    ("Japan", "Tokyo", AS),
    ("Jordan", "Amman", AS),
    ("Kuwait", "Kuwait City", AS),
    ("Kyrgyzstan", "Bishkek", AS),
    ("Laos", "Vientiane", AS),
    ("Lebanon", "Beirut", AS),
    ("Malaysia", "Kuala Lumpur", AS),
    ("the Maldives", "Malé", AS),
    ("Mongolia", "Ulaanbaatar", AS),
    ("Myanmar", "Naypyidaw", AS),
    ("Nepal", "Kathmandu", AS),
    ("North Korea", "Pyongyang", AS),
    ("Oman", "Muscat", AS),
    ("Pakistan", "Islamabad", AS),
    ("the Philippines", "Manila", AS),
    ("Qatar", "Doha", AS),
    ("Saudi Arabia", "Riyadh", AS),
    ("Singapore", "Singapore", AS),
    ("South Korea", "Seoul", AS),
    ("Syria", "Damascus", AS),
    ("Tajikistan", "Dushanbe", AS),
    ("Thailand", "Bangkok", AS),
    ("Timor-Leste", "Dili", AS),
    ("Turkmenistan", "Ashgabat", AS),
    ("the United Arab Emirates", "Abu Dhabi", AS),
    ("Uzbekistan", "Tashkent", AS),
    ("Vietnam", "Hanoi", AS),
    # Transcontinental (kept out of the continent task)
    ("Armenia", "Yerevan", None),
    ("Azerbaijan", "Baku", None),
    ("Cyprus", "Nicosia", None),
    ("Georgia", "Tbilisi", None),
    ("Kazakhstan", "Astana", None),
    ("Russia", "Moscow", None),
    ("Turkey", "Ankara", None),
    # Europe
    ("Albania", "Tirana", EU),
    ("Andorra", "Andorra la Vella", EU),
    ("Austria", "Vienna", EU),
    ("Belarus", "Minsk", EU),
    ("Belgium", "Brussels", EU),
    ("Bosnia and Herzegovina", "Sarajevo", EU),
    ("Bulgaria", "Sofia", EU),
    ("Croatia", "Zagreb", EU),
    ("the Czech Republic", "Prague", EU),
    ("Denmark", "Copenhagen", EU),
    ("Estonia", "Tallinn", EU),
    ("Finland", "Helsinki", EU),
    ("France", "Paris", EU),
    ("Germany", "Berlin", EU),
    ("Greece", "Athens", EU),
    ("Hungary", "Budapest", EU),
    ("Iceland", "Reykjavik", EU),
    ("Ireland", "Dublin", EU),
    ("Italy", "Rome", EU),
    ("Latvia", "Riga", EU),
    ("Liechtenstein", "Vaduz", EU),
    ("Lithuania", "Vilnius", EU),
    ("Luxembourg", "Luxembourg", EU),
    ("Malta", "Valletta", EU),
    ("Moldova", "Chisinau", EU),
    ("Monaco", "Monaco", EU),
    ("Montenegro", "Podgorica", EU),
    ("the Netherlands", "Amsterdam", EU),
    ("North Macedonia", "Skopje", EU),
    ("Norway", "Oslo", EU),
    ("Poland", "Warsaw", EU),
    ("Portugal", "Lisbon", EU),
    ("Romania", "Bucharest", EU),
    ("San Marino", "San Marino", EU),
    ("Serbia", "Belgrade", EU),
    ("Slovakia", "Bratislava", EU),
    ("Slovenia", "Ljubljana", EU),
    ("Spain", "Madrid", EU),
    ("Sweden", "Stockholm", EU),
    ("Switzerland", "Bern", EU),
    ("Ukraine", "Kyiv", EU),
    ("the United Kingdom", "London", EU),
    # North America (incl. Central America and the Caribbean)
    ("Antigua and Barbuda", "Saint John's", NA),
    ("the Bahamas", "Nassau", NA),
    ("Barbados", "Bridgetown", NA),
    ("Belize", "Belmopan", NA),
    ("Canada", "Ottawa", NA),
    ("Costa Rica", "San José", NA),
    ("Cuba", "Havana", NA),
    ("Dominica", "Roseau", NA),
    ("the Dominican Republic", "Santo Domingo", NA),
    ("El Salvador", "San Salvador", NA),
    ("Grenada", "St. George's", NA),
    ("Guatemala", "Guatemala City", NA),
    ("Haiti", "Port-au-Prince", NA),
    ("Honduras", "Tegucigalpa", NA),
    ("Jamaica", "Kingston", NA),
    ("Mexico", "Mexico City", NA),
    ("Nicaragua", "Managua", NA),
    ("Panama", "Panama City", NA),
    ("Saint Kitts and Nevis", "Basseterre", NA),
    ("Saint Lucia", "Castries", NA),
    ("Saint Vincent and the Grenadines", "Kingstown", NA),
    ("Trinidad and Tobago", "Port of Spain", NA),
    ("the United States", "Washington, D.C.", NA),
    # South America
    ("Argentina", "Buenos Aires", SA),
    ("Brazil", "Brasília", SA),
    ("Chile", "Santiago", SA),
    ("Colombia", "Bogotá", SA),
    ("Ecuador", "Quito", SA),
    ("Guyana", "Georgetown", SA),
    ("Paraguay", "Asunción", SA),
    ("Peru", "Lima", SA),
    ("Suriname", "Paramaribo", SA),
    ("Uruguay", "Montevideo", SA),
    ("Venezuela", "Caracas", SA),
    # Oceania
    ("Australia", "Canberra", OC),
    ("Fiji", "Suva", OC),
    ("Kiribati", "South Tarawa", OC),
    ("the Marshall Islands", "Majuro", OC),
    ("Micronesia", "Palikir", OC),
    ("New Zealand", "Wellington", OC),
    ("Palau", "Ngerulmud", OC),
    ("Papua New Guinea", "Port Moresby", OC),
    ("Samoa", "Apia", OC),
    ("the Solomon Islands", "Honiara", OC),
    ("Tonga", "Nuku'alofa", OC),
    ("Tuvalu", "Funafuti", OC),
    ("Vanuatu", "Port Vila", OC),
]

# Where the transcontinental countries lie (used only in the corpus).
TRANSCONTINENTAL = {
    "Armenia": "lies in the South Caucasus, on the boundary between Europe and Asia",
    "Azerbaijan": "lies in the Caucasus, on the boundary between Europe and Asia",
    "Cyprus": "is an island country in the eastern Mediterranean Sea",
    "Georgia": "lies in the Caucasus, on the boundary between Europe and Asia",
    "Kazakhstan": "lies mostly in Central Asia, with a small part in Eastern Europe",
    "Russia": "spans Eastern Europe and Northern Asia",
    "Turkey": "lies mostly in Asia, with a small part in Europe",
}

# (atomic number, symbol, name, category, state at room temperature)
NM, NG, AM, AEM, TM, G12, PTM, MD, HAL, ACT = (
    "a nonmetal",
    "a noble gas",
    "an alkali metal",
    "an alkaline earth metal",
    "a transition metal",
    "a group 12 metal",
    "a post-transition metal",
    "a metalloid",
    "a halogen",
    "an actinide",
)
GAS, LIQ, SOL = "gas", "liquid", "solid"
ELEMENTS: list[tuple[int, str, str, str, str]] = [
    (1, "H", "hydrogen", NM, GAS),
    (2, "He", "helium", NG, GAS),
    (3, "Li", "lithium", AM, SOL),
    (4, "Be", "beryllium", AEM, SOL),
    (5, "B", "boron", MD, SOL),
    (6, "C", "carbon", NM, SOL),
    (7, "N", "nitrogen", NM, GAS),
    (8, "O", "oxygen", NM, GAS),
    (9, "F", "fluorine", HAL, GAS),
    (10, "Ne", "neon", NG, GAS),
    (11, "Na", "sodium", AM, SOL),
    (12, "Mg", "magnesium", AEM, SOL),
    (13, "Al", "aluminium", PTM, SOL),
    (14, "Si", "silicon", MD, SOL),
    (15, "P", "phosphorus", NM, SOL),
    (16, "S", "sulfur", NM, SOL),
    (17, "Cl", "chlorine", HAL, GAS),
    (18, "Ar", "argon", NG, GAS),
    (19, "K", "potassium", AM, SOL),
    (20, "Ca", "calcium", AEM, SOL),
    (21, "Sc", "scandium", TM, SOL),
    (22, "Ti", "titanium", TM, SOL),
    (23, "V", "vanadium", TM, SOL),
    (24, "Cr", "chromium", TM, SOL),
    (25, "Mn", "manganese", TM, SOL),
    (26, "Fe", "iron", TM, SOL),
    (27, "Co", "cobalt", TM, SOL),
    (28, "Ni", "nickel", TM, SOL),
    (29, "Cu", "copper", TM, SOL),
    (30, "Zn", "zinc", G12, SOL),
    (31, "Ga", "gallium", PTM, SOL),
    (32, "Ge", "germanium", MD, SOL),
    (33, "As", "arsenic", MD, SOL),
    (34, "Se", "selenium", NM, SOL),
    (35, "Br", "bromine", HAL, LIQ),
    (36, "Kr", "krypton", NG, GAS),
    (37, "Rb", "rubidium", AM, SOL),
    (38, "Sr", "strontium", AEM, SOL),
    (39, "Y", "yttrium", TM, SOL),
    (40, "Zr", "zirconium", TM, SOL),
    (41, "Nb", "niobium", TM, SOL),
    (42, "Mo", "molybdenum", TM, SOL),
    (43, "Tc", "technetium", TM, SOL),
    (44, "Ru", "ruthenium", TM, SOL),
    (45, "Rh", "rhodium", TM, SOL),
    (46, "Pd", "palladium", TM, SOL),
    (47, "Ag", "silver", TM, SOL),
    (48, "Cd", "cadmium", G12, SOL),
    (49, "In", "indium", PTM, SOL),
    (50, "Sn", "tin", PTM, SOL),
    (51, "Sb", "antimony", MD, SOL),
    (52, "Te", "tellurium", MD, SOL),
    (53, "I", "iodine", HAL, SOL),
    (54, "Xe", "xenon", NG, GAS),
    (55, "Cs", "caesium", AM, SOL),
    (56, "Ba", "barium", AEM, SOL),
    (74, "W", "tungsten", TM, SOL),
    (78, "Pt", "platinum", TM, SOL),
    (79, "Au", "gold", TM, SOL),
    (80, "Hg", "mercury", G12, LIQ),
    (82, "Pb", "lead", PTM, SOL),
    (83, "Bi", "bismuth", PTM, SOL),
    (86, "Rn", "radon", NG, GAS),
    (88, "Ra", "radium", AEM, SOL),
    (92, "U", "uranium", ACT, SOL),
    (94, "Pu", "plutonium", ACT, SOL),
]

# Adjective antonym pairs. Every word appears in exactly one pair.
ANTONYMS: list[tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("tall", "short"), ("fast", "slow"),
    ("happy", "sad"), ("heavy", "light"), ("young", "old"), ("rich", "poor"),
    ("strong", "weak"), ("early", "late"), ("hard", "soft"), ("difficult", "easy"),
    ("wet", "dry"), ("clean", "dirty"), ("full", "empty"), ("open", "closed"),
    ("wide", "narrow"), ("thick", "thin"), ("deep", "shallow"), ("loud", "quiet"),
    ("high", "low"), ("cheap", "expensive"), ("true", "false"), ("good", "bad"),
    ("right", "wrong"), ("first", "last"), ("alive", "dead"), ("awake", "asleep"),
    ("brave", "cowardly"), ("safe", "dangerous"), ("polite", "rude"), ("smooth", "rough"),
    ("sharp", "blunt"), ("tight", "loose"), ("near", "far"), ("public", "private"),
    ("present", "absent"), ("positive", "negative"), ("major", "minor"),
    ("maximum", "minimum"), ("ancient", "modern"), ("beautiful", "ugly"),
    ("honest", "dishonest"), ("possible", "impossible"), ("visible", "invisible"),
    ("legal", "illegal"), ("known", "unknown"), ("patient", "impatient"),
    ("active", "passive"), ("guilty", "innocent"), ("wise", "foolish"),
    ("male", "female"), ("northern", "southern"), ("eastern", "western"),
    ("upper", "lower"), ("inner", "outer"), ("internal", "external"),
    ("horizontal", "vertical"), ("even", "odd"), ("singular", "plural"),
    ("rare", "common"), ("simple", "complex"), ("temporary", "permanent"),
    ("sick", "healthy"), ("tidy", "messy"), ("natural", "artificial"),
    ("optimistic", "pessimistic"), ("superior", "inferior"), ("huge", "tiny"),
    ("wild", "tame"), ("raw", "cooked"), ("fresh", "stale"), ("strict", "lenient"),
    ("cruel", "kind"), ("careful", "careless"), ("useful", "useless"),
    ("black", "white"), ("mature", "immature"), ("same", "different"),
    ("forward", "backward"), ("entrance", "exit"), ("arrival", "departure"),
    ("increase", "decrease"), ("victory", "defeat"), ("friend", "enemy"),
]
# Words whose opposite is ambiguous (e.g. light -> dark or heavy); never asked about.
AMBIGUOUS_CUES = ["short", "light", "old", "hard", "soft", "thin", "right", "full",
                  "present", "common", "kind", "dry", "low", "poor", "odd"]

SORT_WORDS = """
apple banana cherry grape lemon mango melon orange peach pear plum berry
river mountain forest desert ocean island valley lake hill beach field meadow
house garden window door table chair kitchen bottle basket blanket candle mirror
teacher doctor farmer artist pilot baker driver singer writer nurse lawyer sailor
dog cat horse rabbit tiger lion zebra monkey eagle parrot turtle dolphin whale
shark spider bee ant frog snake goat sheep camel panda fox wolf owl
red blue green yellow purple silver golden brown
book pencil paper letter story poem song music picture camera clock watch phone
train bus truck bicycle rocket boat ship plane wagon ladder bridge tower castle
cloud rain snow storm thunder wind sun moon star planet comet winter summer autumn
spring morning evening night bread butter cheese honey sugar salt pepper soup rice
coffee milk water juice cookie cake pizza salad egg onion potato carrot tomato
jacket shirt shoe hat glove scarf ring crown button pocket
happy quick quiet brave gentle bright calm clever eager fancy jolly lucky proud
silly tidy wise zesty humble kind noble
""".split()

# Short-sentence generator pieces for the word-count task.
CS_SUBJECTS = [
    "the cat", "my brother", "a small dog", "the old man", "our teacher", "she", "he",
    "they", "the children", "a young girl", "the farmer", "my best friend", "the tired baker",
    "a tall stranger", "the little boy", "my grandmother", "the new student", "we",
]
CS_VERBS = [
    "ate", "painted", "found", "carried", "watched", "opened", "cleaned", "bought",
    "sold", "read", "fixed", "dropped", "washed", "borrowed", "hid", "wrapped",
]
CS_OBJECTS = [
    "the apple", "a red box", "the heavy door", "bread", "an old book", "the big blue car",
    "a letter", "the window", "some fresh fruit", "the broken chair", "a warm blanket",
    "the wooden spoon", "two small cups", "the shiny bicycle", "a map",
]
CS_TAILS = [
    "", "", "yesterday", "today", "in the garden", "after school", "very quickly",
    "before the storm came", "on a cold winter morning", "with great care", "at noon",
    "near the old bridge", "without saying a word", "for his sister", "last night",
]

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
        "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
        "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_to_words(n: int) -> str:
    """American-style English words for 0 <= n <= 9999 (no 'and'), e.g. 347 -> 'three hundred forty-seven'."""
    if not 0 <= n <= 9999:
        raise ValueError(n)
    if n < 20:
        return ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return TENS[t] + ("-" + ONES[o] if o else "")
    if n < 1000:
        h, r = divmod(n, 100)
        return ONES[h] + " hundred" + (" " + number_to_words(r) if r else "")
    th, r = divmod(n, 1000)
    return ONES[th] + " thousand" + (" " + number_to_words(r) if r else "")


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def bare(country: str) -> str:
    """Country name without a leading article, for the input field."""
    return cap(country)


class Collector:
    """Collects rows, rejecting duplicate keys."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.keys: dict = {}
        self.tasks: Counter = Counter()

    def add(self, key, row: dict, task: str) -> bool:
        if key in self.keys:
            return False
        self.keys[key] = True
        self.rows.append(row)
        self.tasks[task] += 1
        return True


def instr(instruction: str, inp: str, output: str) -> dict:
    return {"instruction": instruction, "input": inp, "output": output}


# --------------------------------------------------------------------------------------
# Instruction data
# --------------------------------------------------------------------------------------


def capital_example(rng: random.Random, country: str, capital: str) -> dict:
    out = f"The capital of {country} is {capital}."
    k = rng.randrange(4)
    if k == 0:
        return instr(f"What is the capital of {country}?", "", out)
    if k == 1:
        return instr(f"What is the capital city of {country}?", "", out)
    if k == 2:
        return instr(f"Name the capital of {country}.", "", out)
    return instr("Give the capital of this country.", bare(country), out)


def continent_example(rng: random.Random, country: str, continent: str) -> dict:
    out = f"{cap(country)} is in {continent}."
    k = rng.randrange(4)
    if k == 0:
        return instr(f"Which continent is {country} in?", "", out)
    if k == 1:
        return instr(f"On which continent is {country}?", "", out)
    if k == 2:
        return instr(f"What continent is {country} located in?", "", out)
    return instr("Name the continent this country is in.", bare(country), out)


def element_example(rng: random.Random, kind: str, el: tuple) -> dict:
    z, sym, name, _cat, _state = el
    if kind == "symbol":
        out = f"The chemical symbol for {name} is {sym}."
        return rng.choice([
            instr(f"What is the chemical symbol for {name}?", "", out),
            instr(f"What is the symbol of the element {name}?", "", out),
            instr("Give the chemical symbol for this element.", name, out),
        ])
    if kind == "number":
        out = f"{cap(name)} has atomic number {z}."
        return rng.choice([
            instr(f"What is the atomic number of {name}?", "", out),
            instr(f"How many protons does an atom of {name} have?", "", out),
            instr("Give the atomic number of this element.", name, out),
        ])
    if kind == "from_symbol":
        out = f"{sym} is the symbol for {name}."
        return rng.choice([
            instr(f"Which element has the symbol {sym}?", "", out),
            instr(f"Which chemical element is {sym}?", "", out),
            instr("Name the element with this chemical symbol.", sym, out),
        ])
    out = f"Element {z} is {name}."
    return rng.choice([
        instr(f"Which element has atomic number {z}?", "", out),
        instr(f"Which element is number {z} on the periodic table?", "", out),
        instr("Name the element with this atomic number.", str(z), out),
    ])


NUMBER_INSTRUCTIONS = [
    "Write the number in words.",
    "Spell out this number in English words.",
    "Convert the number to words.",
]
SORT_INSTRUCTIONS = [
    "Sort these words alphabetically.",
    "Put the following words in alphabetical order.",
    "Arrange the words in alphabetical order.",
]
COUNT_INSTRUCTIONS = [
    "Count the words in this sentence.",
    "How many words are in the following sentence?",
    "Tell me the number of words in this sentence.",
]


def sample_number(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.15:
        return rng.randrange(0, 100)
    if r < 0.5:
        return rng.randrange(100, 1000)
    return rng.randrange(1000, 10000)


def make_sentence(rng: random.Random) -> str:
    parts = [rng.choice(CS_SUBJECTS), rng.choice(CS_VERBS), rng.choice(CS_OBJECTS)]
    tail = rng.choice(CS_TAILS)
    if tail:
        parts.append(tail)
    return cap(" ".join(parts)) + "."


def antonym_cues() -> list[tuple[str, str]]:
    cues = []
    for a, b in ANTONYMS:
        for w, o in ((a, b), (b, a)):
            if w not in AMBIGUOUS_CUES:
                cues.append((w, o))
    return cues


def antonym_example(rng: random.Random, word: str, opposite: str) -> dict:
    out = f"The opposite of {word} is {opposite}."
    k = rng.randrange(4)
    if k == 0:
        return instr(f"What is the opposite of {word}?", "", out)
    if k == 1:
        return instr(f"What is the antonym of {word}?", "", out)
    if k == 2:
        return instr(f"Give a word that means the opposite of {word}.", "", out)
    return instr("Give the opposite of this word.", word, out)


def build_instruct(rng: random.Random) -> Collector:
    col = Collector()

    def key(row):
        return (row["instruction"], row["input"])

    # capitals
    for country, capital, _ in rng.sample(COUNTRIES, N_PER_TASK):
        col.add(key(r := capital_example(rng, country, capital)), r, "capital")
    # continents
    with_cont = [c for c in COUNTRIES if c[2] is not None]
    for country, _, continent in rng.sample(with_cont, min(N_PER_TASK, len(with_cont))):
        col.add(key(r := continent_example(rng, country, continent)), r, "continent")
    # elements: four question kinds over all elements
    el_items = [(k, el) for el in ELEMENTS for k in ("symbol", "number", "from_symbol", "from_number")]
    for kind, el in rng.sample(el_items, N_PER_TASK):
        col.add(key(r := element_example(rng, kind, el)), r, "element")
    # number to words
    while col.tasks["number_words"] < N_PER_TASK:
        n = sample_number(rng)
        r = instr(rng.choice(NUMBER_INSTRUCTIONS), str(n), number_to_words(n))
        col.add(("num", n), r, "number_words")  # one instruction phrasing per number
    # sort words
    while col.tasks["sort_words"] < N_PER_TASK:
        words = rng.sample(SORT_WORDS, rng.randint(3, 6))
        r = instr(rng.choice(SORT_INSTRUCTIONS), " ".join(words), ", ".join(sorted(words)))
        col.add(key(r), r, "sort_words")
    # count words
    while col.tasks["count_words"] < N_PER_TASK:
        s = make_sentence(rng)
        r = instr(rng.choice(COUNT_INSTRUCTIONS), s, f"The sentence has {len(s.split())} words.")
        col.add(("count", s), r, "count_words")
    # antonyms (each cue once)
    cues = antonym_cues()
    for w, o in rng.sample(cues, min(N_PER_TASK, len(cues))):
        col.add(key(r := antonym_example(rng, w, o)), r, "antonym")

    rows = col.rows
    # a word-count-of-one or a duplicate (instruction, input) would be a bug
    assert len({(r["instruction"], r["input"]) for r in rows}) == len(rows)
    rng.shuffle(rows)
    return col


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------


def build_corpus(rng: random.Random) -> tuple[list[dict], Counter]:
    paras: list[str] = []
    kinds: Counter = Counter()

    for country, capital, continent in COUNTRIES:
        c = cap(country)
        if continent is None:
            first = f"{c} is a country that {TRANSCONTINENTAL[country.removeprefix('the ')]}."
        else:
            first = rng.choice([f"{c} is a country in {continent}.",
                                f"{c} is a country located in {continent}."])
        if capital == country.removeprefix("the "):
            second = f"Its capital city is also called {capital}."
        else:
            second = rng.choice([f"Its capital is {capital}.", f"Its capital city is {capital}.",
                                 f"The capital of {country} is {capital}."])
        paras.append(f"{first} {second}")
        kinds["country"] += 1

    for cont in (AF, AS, EU, NA, SA, OC):
        members = [cap(c) for c, _, k in COUNTRIES if k == cont]
        picked = rng.sample(members, 6)
        paras.append(f"{cont} is a continent. Countries in {cont} include "
                     f"{', '.join(picked[:-1])} and {picked[-1]}.")
        kinds["continent"] += 1

    for z, sym, name, cat, state in ELEMENTS:
        s = [f"{cap(name)} is a chemical element with the symbol {sym} and atomic number {z}.",
             f"It is {cat}.", f"At room temperature it is a {state}."]
        paras.append(" ".join(s))
        kinds["element"] += 1

    for a, b in ANTONYMS:
        # state the opposite from a cue whose opposite is unambiguous
        if b in AMBIGUOUS_CUES:
            a, b = b, a
        if a in AMBIGUOUS_CUES:
            paras.append(f"The words {a} and {b} are antonyms. They have opposite meanings.")
        else:
            paras.append(rng.choice([
                f"The words {a} and {b} are antonyms. The opposite of {a} is {b}.",
                f"{cap(b)} and {a} have opposite meanings. The opposite of {a} is {b}.",
            ]))
        kinds["antonym"] += 1

    seen: dict = {}
    while kinds["number"] < 60:
        n = rng.randrange(1, 9999)
        if n in seen:
            continue
        seen[n] = True
        parity = "an even" if n % 2 == 0 else "an odd"
        paras.append(f"The number {n} is written in words as {number_to_words(n)}. "
                     f"It is {parity} number. It comes after {n - 1} and before {n + 1}.")
        kinds["number"] += 1

    rng.shuffle(paras)
    return [{"text": p} for p in paras], kinds


# --------------------------------------------------------------------------------------
# Preferences
# --------------------------------------------------------------------------------------

RAMBLE_OPEN = [
    "Sure! That's a great question, and I'm happy to help you with it.",
    "Great question! Let me think about this for a moment before I answer.",
    "Oh, interesting! Many people wonder about this, so let me explain.",
    "Well, this is something I find really fascinating to think about.",
]
RAMBLE_CLOSE = [
    "I hope this helps! Let me know if you have any other questions.",
    "Feel free to ask me anything else you are curious about!",
    "Please let me know if you would like more details.",
]


def ramble(rng: random.Random, core: str) -> str:
    return f"{rng.choice(RAMBLE_OPEN)} {core} {rng.choice(RAMBLE_CLOSE)}"


def perturb_number(rng: random.Random, n: int) -> int:
    while True:
        digits = list(str(n))
        i = rng.randrange(len(digits))
        new = rng.choice([d for d in "0123456789" if d != digits[i]])
        if i == 0 and new == "0" and len(digits) > 1:
            continue
        digits[i] = new
        return int("".join(digits))


def build_preferences(rng: random.Random, n_per: dict) -> Collector:
    col = Collector()
    # rejection mix: wrong fact ~50 %, rambling ~30 %, bare/unformatted ~20 %
    mode_weights = (["wrong"] * 5) + (["ramble"] * 3) + (["bare"] * 2)

    def add(prompt, chosen, rejected, task, mode):
        assert chosen != rejected
        col.add(prompt, {"prompt": prompt, "chosen": chosen, "rejected": rejected}, f"{task}/{mode}")

    # capitals
    for country, capital, continent in rng.sample(COUNTRIES, n_per["capital"]):
        prompt = rng.choice([f"What is the capital of {country}?", f"Name the capital of {country}."])
        chosen = f"The capital of {country} is {capital}."
        mode = rng.choice(mode_weights)
        if mode == "wrong":
            pool = [cp for c, cp, k in COUNTRIES if k == continent and cp != capital] or \
                   [cp for c, cp, k in COUNTRIES if cp != capital]
            rejected = f"The capital of {country} is {rng.choice(pool)}."
        elif mode == "ramble":
            rejected = ramble(rng, f"If I remember correctly, the answer you are looking for would be {capital}.")
        else:
            rejected = rng.choice([capital.lower(), f"{capital.upper()}!!", f"its {capital} i think"])
        add(prompt, chosen, rejected, "capital", mode)

    # elements: symbol and atomic number questions
    el_items = [(k, el) for el in ELEMENTS for k in ("symbol", "number")]
    for kind, (z, sym, name, _c, _s) in rng.sample(el_items, n_per["element"]):
        mode = rng.choice(mode_weights)
        if kind == "symbol":
            prompt = f"What is the chemical symbol for {name}?"
            chosen = f"The chemical symbol for {name} is {sym}."
            if mode == "wrong":
                wrong = rng.choice([
                    rng.choice([e[1] for e in ELEMENTS if e[1] != sym]),
                    name[:2].capitalize() if name[:2].capitalize() != sym else name[0].upper() + name[2],
                ])
                if wrong == sym:
                    wrong = rng.choice([e[1] for e in ELEMENTS if e[1] != sym])
                rejected = f"The chemical symbol for {name} is {wrong}."
            elif mode == "ramble":
                rejected = ramble(rng, f"Chemists usually write {name} with the letters {sym} in formulas.")
            else:
                rejected = rng.choice([sym.lower(), f"symbol = {sym}", f"{sym}??"])
        else:
            prompt = f"What is the atomic number of {name}?"
            chosen = f"{cap(name)} has atomic number {z}."
            if mode == "wrong":
                wrong = z + rng.choice([-2, -1, 1, 2]) if z > 2 else z + rng.choice([1, 2])
                rejected = f"{cap(name)} has atomic number {wrong}."
            elif mode == "ramble":
                rejected = ramble(rng, f"The number you want for {name} is {z}, which counts its protons.")
            else:
                rejected = rng.choice([str(z), f"{z}!!", f"number {z} i guess"])
        add(prompt, chosen, rejected, "element", mode)

    # antonyms
    cues = antonym_cues()
    all_words = [w for pair in ANTONYMS for w in pair]
    for w, o in rng.sample(cues, n_per["antonym"]):
        prompt = f"What is the opposite of {w}?"
        chosen = f"The opposite of {w} is {o}."
        mode = rng.choice(mode_weights)
        if mode == "wrong":
            rejected = f"The opposite of {w} is {rng.choice([x for x in all_words if x not in (w, o)])}."
        elif mode == "ramble":
            rejected = ramble(rng, f"Words can be tricky, but I would say that {o} is what you want here.")
        else:
            rejected = rng.choice([o, o.upper(), f"{o}??"])
        add(prompt, chosen, rejected, "antonym", mode)

    # number words
    while sum(v for k, v in col.tasks.items() if k.startswith("number_words/")) < n_per["number_words"]:
        n = sample_number(rng)
        prompt = f"Write the number {n} in words."
        if prompt in col.keys:
            continue
        chosen = number_to_words(n)
        mode = rng.choice(mode_weights)
        if mode == "wrong":
            rejected = number_to_words(perturb_number(rng, n))
        elif mode == "ramble":
            rejected = ramble(rng, f"Written out in full, {n} would be {chosen}.")
        else:
            rejected = rng.choice([str(n), f"{n} in words", chosen.upper()])
        add(prompt, chosen, rejected, "number_words", mode)

    rng.shuffle(col.rows)
    return col


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def self_check() -> None:
    assert number_to_words(0) == "zero"
    assert number_to_words(15) == "fifteen"
    assert number_to_words(40) == "forty"
    assert number_to_words(101) == "one hundred one"
    assert number_to_words(347) == "three hundred forty-seven"
    assert number_to_words(1010) == "one thousand ten"
    assert number_to_words(9999) == "nine thousand nine hundred ninety-nine"
    assert len(set(SORT_WORDS)) == len(SORT_WORDS), "duplicate sort words"
    words = [w for p in ANTONYMS for w in p]
    assert len(set(words)) == len(words), "antonym word used twice"
    assert len({c for c, _, _ in COUNTRIES}) == len(COUNTRIES)
    assert len({e[0] for e in ELEMENTS}) == len({e[1] for e in ELEMENTS}) == len(ELEMENTS)
    assert set(TRANSCONTINENTAL) == {c for c, _, k in COUNTRIES if k is None}


def main() -> None:
    default_out = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "resources" / "data"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    self_check()

    instruct = build_instruct(random.Random(SEED))
    corpus, corpus_kinds = build_corpus(random.Random(SEED + 1))
    prefs = build_preferences(random.Random(SEED + 2),
                              {"capital": 160, "element": 120, "antonym": 140, "number_words": 180})

    write_jsonl(args.out / "facts_instruct.jsonl", instruct.rows)
    write_jsonl(args.out / "facts_corpus.jsonl", corpus)
    write_jsonl(args.out / "facts_preferences.jsonl", prefs.rows)

    print(f"facts_instruct.jsonl    {len(instruct.rows):5d} rows  {dict(sorted(instruct.tasks.items()))}")
    print(f"facts_corpus.jsonl      {len(corpus):5d} rows  {dict(sorted(corpus_kinds.items()))}")
    pt = Counter(k.split('/')[0] for k in prefs.tasks.elements())
    pm = Counter(k.split('/')[1] for k in prefs.tasks.elements())
    print(f"facts_preferences.jsonl {len(prefs.rows):5d} rows  {dict(sorted(pt.items()))}  "
          f"rejection kinds {dict(sorted(pm.items()))}")


if __name__ == "__main__":
    main()
