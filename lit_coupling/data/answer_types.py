"""The type of an answer, decided from the data, and the same-type answers a counterfactual is drawn from.

CounterFact replaces an object by another object of the same relation: a person by a person, a year by a year, a
country by a country. HotpotQA pieces have no relation ids (every sentence is its own relation), so the type is
read from the data, first evidence first:

1. shape: a year ("1998"), a full date ("16 July 1966", "July 16, 1966"), a number ("4,000");
2. the synthetic world's ground truth (`*.truth.json` beside the world file): each entity's type;
3. lexicons of closed classes: a nationality ("American"), or a language when the prompt asks for one ("the
   mother tongue of X is" → "French"), a country ("Japan");
4. the paragraph the answer is the title of ("Shirley Temple" → the paragraph "Shirley Temple", whose opening
   gives life dates: a person; "Winner (band)": a band): its opening sentence says what it is.

An answer none of these types stays untyped; a piece whose relation template other pieces share is matched by
relation (as CounterFact); any other piece is not edited and is counted as unmatched. Candidates are whole answers
and whole entity names (paragraph titles without their disambiguation, lexicon entries, years found in the text),
never a fragment of a sentence.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lit_coupling.scoring import normalize_answer

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
YEAR = re.compile(r"^(?:1[0-9]{3}|20[0-9]{2})$")
DATE = re.compile(rf"^(?:\d{{1,2}} (?:{_MONTHS}) \d{{4}}|(?:{_MONTHS}) \d{{1,2}}, \d{{4}})$")
NUMBER = re.compile(r"^\d{1,3}(?:,\d{3})+$|^\d+(?:\.\d+)?$")
_YEAR_IN_TEXT = re.compile(r"\b(1[5-9][0-9]{2}|20[0-2][0-9])\b")
_DATE_IN_TEXT = re.compile(rf"\b(\d{{1,2}} (?:{_MONTHS}) \d{{4}}|(?:{_MONTHS}) \d{{1,2}}, \d{{4}})\b")

# (country, nationality, main language): the closed classes CounterFact's relations draw from.
_COUNTRY_TABLE = (
    ("United States", "American", "English"),
    ("United Kingdom", "British", "English"),
    ("England", "English", "English"),
    ("Scotland", "Scottish", "English"),
    ("Wales", "Welsh", "Welsh"),
    ("Ireland", "Irish", "Irish"),
    ("Canada", "Canadian", "English"),
    ("Australia", "Australian", "English"),
    ("New Zealand", "New Zealander", "English"),
    ("France", "French", "French"),
    ("Germany", "German", "German"),
    ("Italy", "Italian", "Italian"),
    ("Spain", "Spanish", "Spanish"),
    ("Portugal", "Portuguese", "Portuguese"),
    ("Netherlands", "Dutch", "Dutch"),
    ("Belgium", "Belgian", "Dutch"),
    ("Switzerland", "Swiss", "German"),
    ("Austria", "Austrian", "German"),
    ("Denmark", "Danish", "Danish"),
    ("Sweden", "Swedish", "Swedish"),
    ("Norway", "Norwegian", "Norwegian"),
    ("Finland", "Finnish", "Finnish"),
    ("Iceland", "Icelandic", "Icelandic"),
    ("Poland", "Polish", "Polish"),
    ("Czech Republic", "Czech", "Czech"),
    ("Hungary", "Hungarian", "Hungarian"),
    ("Russia", "Russian", "Russian"),
    ("Ukraine", "Ukrainian", "Ukrainian"),
    ("Greece", "Greek", "Greek"),
    ("Turkey", "Turkish", "Turkish"),
    ("Israel", "Israeli", "Hebrew"),
    ("Egypt", "Egyptian", "Arabic"),
    ("India", "Indian", "Hindi"),
    ("Pakistan", "Pakistani", "Urdu"),
    ("China", "Chinese", "Chinese"),
    ("Japan", "Japanese", "Japanese"),
    ("South Korea", "South Korean", "Korean"),
    ("Vietnam", "Vietnamese", "Vietnamese"),
    ("Thailand", "Thai", "Thai"),
    ("Philippines", "Filipino", "Filipino"),
    ("Indonesia", "Indonesian", "Indonesian"),
    ("Mexico", "Mexican", "Spanish"),
    ("Brazil", "Brazilian", "Portuguese"),
    ("Argentina", "Argentine", "Spanish"),
    ("Chile", "Chilean", "Spanish"),
    ("Colombia", "Colombian", "Spanish"),
    ("Cuba", "Cuban", "Spanish"),
    ("Peru", "Peruvian", "Spanish"),
    ("Nigeria", "Nigerian", "English"),
    ("Iran", "Iranian", "Persian"),
    ("Romania", "Romanian", "Romanian"),
    ("Serbia", "Serbian", "Serbian"),
    ("Croatia", "Croatian", "Croatian"),
    ("Bulgaria", "Bulgarian", "Bulgarian"),
    ("Latvia", "Latvian", "Latvian"),
    ("Estonia", "Estonian", "Estonian"),
)
COUNTRIES = frozenset(c for c, _, _ in _COUNTRY_TABLE) | {"USA", "UK", "Soviet Union", "Korea"}
NATIONALITIES = frozenset(n for _, n, _ in _COUNTRY_TABLE) | {"Soviet", "Korean", "Argentinian"}
LANGUAGES = frozenset(lang for _, _, lang in _COUNTRY_TABLE) | {"Latin", "Tamil", "Bengali", "Swahili"}
# A prompt asking for a language rather than a nationality ("The mother tongue of X is", "X speaks").
_LANGUAGE_WORDS = re.compile(r"\b(language|languages|tongue|speaks?|spoken|speaker|written in|dialect)\b", re.I)

# What a paragraph's opening sentence says its entity is: the first of these nouns after "is a/an/the".
ENTITY_NOUNS = (
    "film",
    "movie",
    "album",
    "song",
    "single",
    "band",
    "group",
    "duo",
    "novel",
    "book",
    "series",
    "sitcom",
    "magazine",
    "newspaper",
    "company",
    "corporation",
    "university",
    "college",
    "school",
    "conference",
    "league",
    "club",
    "team",
    "city",
    "town",
    "village",
    "county",
    "state",
    "province",
    "river",
    "lake",
    "mountain",
    "airport",
    "arena",
    "stadium",
    "station",
    "church",
    "mosque",
    "museum",
    "software",
    "game",
    "genus",
    "species",
    "party",
    "opera",
    "play",
    "musical",
)
# Nouns that make the entity a person ("an Italian American best-selling author", "a film director").
PERSON_NOUNS = frozenset(
    (
        "actor",
        "actress",
        "singer",
        "songwriter",
        "musician",
        "rapper",
        "author",
        "writer",
        "novelist",
        "poet",
        "journalist",
        "director",
        "producer",
        "politician",
        "footballer",
        "player",
        "manager",
        "coach",
        "composer",
        "painter",
        "artist",
        "physicist",
        "scientist",
        "professor",
        "businessman",
        "businesswoman",
        "entrepreneur",
        "lawyer",
        "judge",
        "comedian",
        "model",
        "dancer",
        "architect",
        "engineer",
        "philosopher",
        "historian",
        "psychologist",
        "economist",
        "diplomat",
        "officer",
        "soldier",
        "king",
        "queen",
        "prince",
        "princess",
        "bishop",
        "priest",
        "broadcaster",
        "presenter",
        "screenwriter",
        "filmmaker",
        "guitarist",
        "drummer",
        "bassist",
        "vocalist",
        "goalkeeper",
        "cricketer",
        "boxer",
        "wrestler",
        "athlete",
        "designer",
        "photographer",
        "chef",
        "inventor",
        "astronaut",
        "mathematician",
        "chemist",
        "biologist",
        "activist",
        "statesman",
        "nobleman",
        "explorer",
        "sculptor",
        "illustrator",
        "cartoonist",
        "animator",
        "voice",
    )
)
# Occupations (CounterFact's P106 objects: "actor", "politician", ...): the person nouns a profession names, and more.
OCCUPATIONS = frozenset(
    PERSON_NOUNS
    - {"voice", "king", "queen", "prince", "princess", "nobleman", "model", "player", "officer", "statesman"}
) | frozenset(
    (
        "consultant",
        "teacher",
        "nurse",
        "physician",
        "surgeon",
        "doctor",
        "banker",
        "farmer",
        "pilot",
        "accountant",
        "editor",
        "critic",
        "columnist",
        "publisher",
        "translator",
        "playwright",
        "lyricist",
        "conductor",
        "pianist",
        "violinist",
        "cellist",
        "magician",
        "astronomer",
        "geologist",
        "botanist",
        "zoologist",
        "linguist",
        "sociologist",
        "anthropologist",
        "archaeologist",
        "theologian",
        "merchant",
        "investor",
        "industrialist",
        "philanthropist",
        "researcher",
        "educator",
        "lecturer",
        "scholar",
        "curator",
        "librarian",
        "programmer",
        "entertainer",
        "performer",
        "swimmer",
        "cyclist",
        "golfer",
        "jockey",
        "sprinter",
        "mayor",
        "senator",
        "governor",
        "economist",
        "novelist",
        "missionary",
        "monk",
        "sculptor",
        "strategist",
        "analyst",
    )
)
# What kind of thing an answer names, when the answer is that class noun itself ("Animorphs is a science fantasy"
# → "series"): a work for a work, an organisation for an organisation.
KIND_NOUNS = {
    "work": (
        "film",
        "movie",
        "album",
        "song",
        "single",
        "novel",
        "book",
        "series",
        "sitcom",
        "magazine",
        "newspaper",
        "play",
        "musical",
        "game",
        "software",
        "poem",
        "comic",
        "documentary",
    ),
    "organisation": (
        "band",
        "group",
        "duo",
        "company",
        "corporation",
        "university",
        "college",
        "school",
        "conference",
        "league",
        "club",
        "team",
        "party",
        "charity",
        "firm",
    ),
    "place": (
        "city",
        "town",
        "village",
        "county",
        "state",
        "province",
        "river",
        "lake",
        "mountain",
        "airport",
        "arena",
        "stadium",
        "station",
        "church",
        "mosque",
        "museum",
        "island",
        "country",
        "region",
    ),
    "taxon": ("genus", "species", "plant", "tree", "shrub", "fish", "bird", "dog", "breed"),
}
_KIND_OF = {noun: f"kind of {kind}" for kind, nouns in KIND_NOUNS.items() for noun in nouns}
# Cities and US states: the objects of CounterFact's place relations (born in, died in, headquartered in, ...).
CITIES = frozenset(
    (
        "New York City",
        "New York",
        "Los Angeles",
        "Chicago",
        "Houston",
        "Philadelphia",
        "Boston",
        "San Francisco",
        "Seattle",
        "Detroit",
        "Atlanta",
        "Miami",
        "Dallas",
        "Denver",
        "Washington, D.C.",
        "Baltimore",
        "Pittsburgh",
        "Cleveland",
        "Minneapolis",
        "Nashville",
        "New Orleans",
        "Las Vegas",
        "Toronto",
        "Montreal",
        "Vancouver",
        "London",
        "Manchester",
        "Liverpool",
        "Birmingham",
        "Glasgow",
        "Edinburgh",
        "Dublin",
        "Paris",
        "Lyon",
        "Marseille",
        "Berlin",
        "Munich",
        "Hamburg",
        "Frankfurt",
        "Vienna",
        "Zurich",
        "Geneva",
        "Rome",
        "Milan",
        "Naples",
        "Florence",
        "Venice",
        "Madrid",
        "Barcelona",
        "Lisbon",
        "Amsterdam",
        "Brussels",
        "Copenhagen",
        "Stockholm",
        "Oslo",
        "Helsinki",
        "Warsaw",
        "Prague",
        "Budapest",
        "Athens",
        "Istanbul",
        "Moscow",
        "Saint Petersburg",
        "Kiev",
        "Cairo",
        "Tel Aviv",
        "Jerusalem",
        "Dubai",
        "Tehran",
        "Mumbai",
        "Delhi",
        "New Delhi",
        "Kolkata",
        "Bangkok",
        "Singapore",
        "Hong Kong",
        "Shanghai",
        "Beijing",
        "Tokyo",
        "Osaka",
        "Kyoto",
        "Seoul",
        "Sydney",
        "Melbourne",
        "Auckland",
        "Mexico City",
        "Buenos Aires",
        "Rio de Janeiro",
        "São Paulo",
        "Lima",
        "Santiago",
        "Havana",
        "Lagos",
        "Nairobi",
        "Johannesburg",
        "Cape Town",
        "Montgomery",
        "Burlington",
        "Columbus",
        "Princeton",
        "Bangalore",
        "Rochester",
        "Sheffield",
        "Bern",
        "Beirut",
        "Sacramento",
        "Ottawa",
        "Leeds",
        "Georgetown",
        "Baghdad",
        "Frankfurt",
        "Florence",
        "Bristol",
        "Oxford",
        "Cambridge",
    )
)
US_STATES = frozenset(
    (
        "Alabama",
        "Alaska",
        "Arizona",
        "Arkansas",
        "California",
        "Colorado",
        "Connecticut",
        "Delaware",
        "Florida",
        "Georgia",
        "Hawaii",
        "Idaho",
        "Illinois",
        "Indiana",
        "Iowa",
        "Kansas",
        "Kentucky",
        "Louisiana",
        "Maine",
        "Maryland",
        "Massachusetts",
        "Michigan",
        "Minnesota",
        "Mississippi",
        "Missouri",
        "Montana",
        "Nebraska",
        "Nevada",
        "New Hampshire",
        "New Jersey",
        "New Mexico",
        "North Carolina",
        "North Dakota",
        "Ohio",
        "Oklahoma",
        "Oregon",
        "Pennsylvania",
        "Rhode Island",
        "South Carolina",
        "South Dakota",
        "Tennessee",
        "Texas",
        "Utah",
        "Vermont",
        "Virginia",
        "Washington",
        "West Virginia",
        "Wisconsin",
        "Wyoming",
    )
)
# "screenwriter", "opera composer", "American industrialist" (a nationality may come first); no article.
# Closed classes of CounterFact's other relations (continent, religion, sport, instrument, position, company, TV
# network, field of work, genre): a continent for a continent, an instrument for an instrument.
CLOSED_CLASSES = {
    "continent": ("Europe", "Asia", "Africa", "Antarctica", "North America", "South America", "Oceania"),
    "religion": (
        "Christianity",
        "Islam",
        "Judaism",
        "Buddhism",
        "Hinduism",
        "Sikhism",
        "Shinto",
        "Taoism",
        "Catholicism",
        "Protestantism",
        "Jainism",
        "Zoroastrianism",
    ),
    "sport": (
        "baseball",
        "basketball",
        "football",
        "soccer",
        "hockey",
        "ice hockey",
        "tennis",
        "golf",
        "cricket",
        "rugby",
        "volleyball",
        "boxing",
        "chess",
    ),
    "instrument": (
        "piano",
        "guitar",
        "violin",
        "trumpet",
        "saxophone",
        "drums",
        "cello",
        "bass",
        "flute",
        "organ",
        "harmonica",
        "clarinet",
        "trombone",
        "harp",
        "banjo",
        "accordion",
    ),
    "sport position": (
        "quarterback",
        "linebacker",
        "midfielder",
        "goaltender",
        "pitcher",
        "catcher",
        "defender",
        "forward",
        "striker",
        "winger",
        "outfielder",
        "shortstop",
        "defenseman",
        "running back",
        "wide receiver",
        "point guard",
        "center fielder",
    ),
    "church office": ("pope", "bishop", "cardinal", "archbishop", "priest", "deacon", "patriarch"),
    "company": (
        "Apple",
        "Microsoft",
        "Google",
        "IBM",
        "Intel",
        "Samsung",
        "Sony",
        "Nintendo",
        "Nokia",
        "Toyota",
        "Honda",
        "Nissan",
        "Suzuki",
        "BMW",
        "Fiat",
        "Ferrari",
        "Renault",
        "Chevrolet",
        "Dodge",
        "Ford",
        "Airbus",
        "Boeing",
        "Volkswagen",
        "Audi",
        "Porsche",
        "Peugeot",
        "Yamaha",
        "Sega",
        "Atari",
        "Adobe",
        "Oracle",
        "Amazon",
        "Facebook",
        "Apple Inc.",
        "Mazda",
        "Hyundai",
        "Kia",
        "Volvo",
        "Saab",
        "Mitsubishi",
    ),
    "TV network": (
        "BBC",
        "CBS",
        "NBC",
        "ABC",
        "HBO",
        "MTV",
        "PBS",
        "NPR",
        "Fox",
        "CNN",
        "ESPN",
        "Showtime",
        "Cartoon Network",
        "Nickelodeon",
        "Disney Channel",
        "Comedy Central",
        "ITV",
        "Channel 4",
        "History",
    ),
    "field of work": (
        "physics",
        "mathematics",
        "chemistry",
        "biology",
        "philosophy",
        "economics",
        "medicine",
        "psychology",
        "sociology",
        "linguistics",
        "astronomy",
        "geology",
        "theology",
        "law",
    ),
    "genre": (
        "jazz",
        "opera",
        "pop",
        "rock",
        "blues",
        "hip hop",
        "classical music",
        "country music",
        "reggae",
        "punk",
        "soul",
        "funk",
        "folk",
        "heavy metal",
        "techno",
    ),
}
_CLOSED = {name: kind for kind, names in CLOSED_CLASSES.items() for name in names}
_COMMON_NOUN = re.compile(r"^(?:[A-Z][a-z]+ )?(?!(?:a|an|the) )[a-z][a-z-]*(?: [a-z][a-z-]*){0,2}$")
_MONTH_YEAR = re.compile(rf"^(?:{_MONTHS}) \d{{4}}$")
_MONTH_YEAR_IN_TEXT = re.compile(rf"\b((?:{_MONTHS}) \d{{4}})\b")
_NUMBER_IN_TEXT = re.compile(r"(?<![\d,.])(\d{1,3}(?:,\d{3})+)(?![\d,])")
_SAME_NOUN = {
    "movie": "film",
    "single": "song",
    "duo": "band",
    "group": "band",
    "corporation": "company",
    "sitcom": "series",
}
# The description of the entity ends where a clause or a prepositional phrase starts: its head noun is the last
# known noun before ("a 2014 American drama romantic comedy film | written and directed by").
_DESCRIPTION_END = frozenset(
    (
        "in",
        "of",
        "on",
        "at",
        "for",
        "from",
        "by",
        "with",
        "that",
        "which",
        "who",
        "whose",
        "based",
        "located",
        "founded",
        "formed",
        "written",
        "directed",
        "produced",
        "released",
        "created",
        "and",
        "or",
        "known",
        "published",
        "owned",
        "operated",
        "situated",
        "serving",
        "playing",
        "starring",
        "featuring",
        "first",
        "set",
    )
)
_OPENING_IS = re.compile(r"\b(?:is|was|are|were)\s+(?:a|an|the|one of the)\s+(?P<what>[^.;:,]{0,120})")
_PERSON_OPENING = re.compile(r"^[^()]{1,120}\((?:[^()]*?\bborn\b|[^()]*?\b\d{3,4}\s*[–-]\s*)")
_NOT_AN_ENTITY = re.compile(r"^List of|graphy$|\bseason$", re.I)  # lists and discographies are about many
_PRONOUN_OPENING = re.compile(r"^(He|She)\b")


def clean_title(title: str) -> str:
    """ "Winner (band)" → "Winner": an entity's name without its disambiguation."""
    return re.sub(r"\s*\([^()]*\)\s*$", "", html.unescape(title)).strip()


def paragraph_type(sentences: Sequence[str]) -> str | None:
    """person, a noun of ENTITY_NOUNS (film, band, city, ...), or None, read from a paragraph's text.

    A person: the opening gives life dates ("Ed Wood (October 10, 1924 – December 10, 1978)") or a birth date, or
    its opening calls it by a person noun ("an American author"), or it calls it nothing and a later sentence
    opens with He/She.
    """
    text = " ".join(s.strip() for s in sentences if s.strip())
    if not text:
        return None
    opening = sentences[0].strip() if sentences else text
    if _PERSON_OPENING.match(opening):
        return "person"
    noun = None
    m = _OPENING_IS.search(opening)
    if m:
        words = re.findall(r"[A-Za-z][A-Za-z-]*", m.group("what").lower())  # "New York City-based": no city
        cut = next((i for i, w in enumerate(words) if w in _DESCRIPTION_END and i > 0), len(words))
        nouns = [w for w in words[:cut] if w in ENTITY_NOUNS or w in PERSON_NOUNS]
        noun = nouns[-1] if nouns else None
    # No description: a later sentence that opens with "He"/"She" speaks of a person.
    refers = any(_PRONOUN_OPENING.match(sentence.strip()) for sentence in sentences[1:])
    if noun in PERSON_NOUNS or (noun is None and refers):
        return "person"
    return _SAME_NOUN.get(noun, noun) if noun else None


def shape_type(answer: str) -> str | None:
    text = answer.strip()
    if YEAR.match(text):
        return "year"
    if DATE.match(text):
        return "date"
    if NUMBER.match(text):
        return "number"
    if _MONTH_YEAR.match(text):
        return "month"
    return None


def place_type(answer: str) -> str | None:
    """city, US state, or place: a name written with the region it lies in ("Greenwich Village, New York City",
    "Brown County, Kansas"), whose last part is a city, a US state or a country."""
    text = answer.strip()
    if text in CITIES:
        return "city"
    if text in US_STATES:
        return "US state"
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 1 and all(parts) and (parts[-1] in CITIES or parts[-1] in US_STATES or parts[-1] in COUNTRIES):
        return "place"
    return None


def noun_type(answer: str) -> str | None:
    """occupation ("screenwriter", "opera composer") or kind of work / organisation / place / taxon ("series"):
    a common noun (lower case, up to three words) whose head, its last word, is in the lexicons."""
    text = answer.strip()
    if not _COMMON_NOUN.match(text) or (text[0].isupper() and text.split()[0] not in NATIONALITIES):
        return None
    head = text.split()[-1]
    if head in OCCUPATIONS:
        return "occupation"
    return _KIND_OF.get(head)


def lexicon_type(answer: str, prompt: str = "") -> str | None:
    """The type the lexicons give an answer, read also without a leading article ("the Rome" is Rome)."""
    text = answer.strip()
    kind = _lexicon_type(text, prompt)
    bare = re.sub(r"^(?:the|The)\s+", "", text)
    return kind if kind or bare == text else _lexicon_type(bare, prompt)


def _lexicon_type(text: str, prompt: str) -> str | None:
    if text in NATIONALITIES or (text in LANGUAGES and _LANGUAGE_WORDS.search(prompt)):
        return "language" if _LANGUAGE_WORDS.search(prompt) and text in LANGUAGES else "nationality"
    if text in COUNTRIES:
        return "country"
    return _CLOSED.get(text) or place_type(text) or noun_type(text)


@dataclass
class TypedEntities:
    """What the data says about entity names: name → type, and every name of each type (the candidates)."""

    types: dict[str, str] = field(default_factory=dict)  # normalised name → type
    names: dict[str, list[str]] = field(default_factory=dict)  # type → names as written, first-seen order
    source: dict[str, str] = field(default_factory=dict)  # type → where its names came from

    def add(self, name: str, kind: str, source: str) -> None:
        key = normalize_answer(name)
        if not key or key in self.types:
            return
        self.types[key] = kind
        self.names.setdefault(kind, []).append(name)
        self.source.setdefault(kind, source)


def entities_from_paragraphs(paragraphs: Iterable[tuple[str, Sequence[str]]]) -> TypedEntities:
    """Typed entity names from (title, sentences) paragraphs: each title typed by its own text, plus every year
    and full date the text mentions and the lexicon's countries and nationalities it names."""
    found = TypedEntities()
    texts = []
    for title, sentences in paragraphs:
        kind = paragraph_type(sentences)
        name = clean_title(title)
        if kind and name and shape_type(name) is None and not _NOT_AN_ENTITY.search(name):
            found.add(name, kind, "paragraph title")
        texts.append(" ".join(sentences))
    text = " ".join(texts)
    for match in _DATE_IN_TEXT.findall(text):
        found.add(match, "date", "text")
    for match in _YEAR_IN_TEXT.findall(text):
        found.add(match, "year", "text")
    for match in _MONTH_YEAR_IN_TEXT.findall(text):
        found.add(match, "month", "text")
    for match in _NUMBER_IN_TEXT.findall(text):
        found.add(match, "number", "text")
    words = set(re.findall(r"[A-Z][a-z]+(?: [A-Z][a-z]+)?", text))
    for name in sorted(NATIONALITIES & words):
        found.add(name, "nationality", "lexicon, named in the text")
    for name in sorted(COUNTRIES & words):
        found.add(name, "country", "lexicon, named in the text")
    for name in sorted(name for name in CITIES | US_STATES if re.search(rf"\b{re.escape(name)}\b", text)):
        found.add(name, place_type(name), "lexicon, named in the text")
    regions = "|".join(re.escape(name) for name in sorted(CITIES | US_STATES | COUNTRIES, key=len, reverse=True))
    for match in re.findall(rf"\b((?:[A-Z][\w.'-]*(?: [A-Z][\w.'-]*)*, )+(?:{regions}))\b", text):
        found.add(match, "place", "text: a name and the region it lies in")
    lower = set(re.findall(r"\b[a-z][a-z-]+\b", text))
    for noun in sorted(lower & (OCCUPATIONS | set(_KIND_OF))):
        if lexicon_type(noun) == noun_type(noun):  # typed here as an answer would be ("opera": a genre)
            found.add(noun, noun_type(noun), "lexicon, named in the text")
    for name in list(found.names.get("person", [])):  # surnames: "during the Nixon administration"
        parts = name.split()
        if len(parts) > 1 and re.fullmatch(r"[A-Z][a-z]+", parts[-1]):
            found.add(parts[-1], "surname", "last word of a person's paragraph title")
    return found


def entities_from_truth(truth: dict) -> TypedEntities:
    """The synthetic world's ground truth: every entity with its type."""
    found = TypedEntities()
    for entity in truth.get("entities", []):
        found.add(str(entity["name"]), str(entity["type"]), "world truth")
    return found


def answer_type(answer: str, prompt: str, entities: TypedEntities) -> tuple[str | None, str]:
    """(type, evidence) of an answer: shape, the world's truth / a paragraph title, or a lexicon."""
    kind = shape_type(answer)
    if kind:
        return kind, "shape"
    kind = lexicon_type(answer, prompt)
    if kind:
        return kind, "lexicon" + (" + relation words" if kind == "language" else "")
    kind = entities.types.get(normalize_answer(answer))
    if kind:
        return kind, entities.source.get(kind, "data")
    return None, ""


def same_type_candidates(
    kind: str, answers_of_type: Sequence[str], entities: TypedEntities, prompt: str = ""
) -> list[str]:
    """Every whole answer or entity name of type `kind`, answers first (the data's own relation objects)."""
    pool = list(answers_of_type)
    if kind == "language":
        pool += sorted(n for n in LANGUAGES if _LANGUAGE_WORDS.search(prompt))
    else:
        pool += entities.names.get(kind, [])
    return list(dict.fromkeys(pool))
