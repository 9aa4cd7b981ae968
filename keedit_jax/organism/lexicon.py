"""The fixed words of the synthetic world: vocabularies, relation templates and text phrasings.

Everything here is data. `world.build_world` draws names and facts from it with a seeded
generator, so the world is a pure function of its seed. Relation ids follow Wikidata (P19 =
place of birth, ...) so that benchmark records look like the published ones (anchors §8).

Template conventions:
- cloze `templates` end just before the object, which follows after one space (CounterFact's
  `prompt` convention), and mention the subject as `{subject}`;
- `questions[0]` is the relation's canonical question (ZsRE `src`, UnKE sub-questions), the other
  questions are its paraphrases;
- `noun_phrases` name the object as a phrase about the subject, for multi-hop questions;
- person relations also have long-text phrasings (`PHRASINGS`), where `{object}` may sit anywhere.
"""

from __future__ import annotations

import dataclasses

# Invented names are built as INITIAL VOWEL (MEDIAL VOWEL)+ FINAL, e.g. "" a "r" e "n" = Aren,
# "k" a "st" o "r" = Kastor: consonant clusters never meet, so every name is pronounceable.
INITIALS = ("", *"b d f g h k l m n p r s t v z br dr kr st th tr".split())
MEDIALS = tuple("b d k l m n r s t v z nd rn st lt rk sh".split())
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei")
FINALS = ("", "", "", "n", "r", "l", "s", "m", "th", "nd")

CITY_SUFFIXES = ("", "", "holm", "ford", "mere", "vale", "wick", "stad", "port")
COUNTRY_SUFFIXES = ("ia", "ora", "and", "esh")
LANGUAGE_SUFFIXES = ("ic", "ese", "ish", "ian")
ORGANISATION_SUFFIXES = ("Works", "Labs", "Foundry", "Mills", "Guild", "Press", "Systems")
SCHOOL_SUFFIXES = ("College", "Academy", "Institute")

# Closed English vocabularies. Professions start with a consonant so "a {object}" reads well.
PROFESSIONS = tuple(
    "baker carpenter chemist dentist doctor farmer fisher gardener jeweller judge lawyer "
    "librarian mason nurse painter pharmacist pilot potter sailor surgeon tailor teacher "
    "translator veterinarian weaver".split()
)
INSTRUMENTS = tuple(
    "accordion banjo bassoon cello clarinet drums flute guitar harp mandolin oboe piano "
    "trombone trumpet violin".split()
)
SPORTS = tuple(
    "archery badminton basketball boxing climbing cricket cycling fencing golf hockey "
    "rowing rugby skiing swimming tennis".split()
)
INDUSTRIES = tuple(
    "banking brewing construction insurance mining publishing shipping software textiles "
    "tourism".split()
)
MONTHS = tuple(
    "January February March April May June July August September October November December".split()
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Relation:
    """A relation with its cloze templates, questions and noun phrases."""

    relation_id: str
    name: str  # Wikidata label, used in MQuAKE `triples_labeled`
    subject_kind: str
    object_kind: str
    templates: tuple[str, ...]
    questions: tuple[str, ...]
    noun_phrases: tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phrasing:
    """How a person relation is said in long texts; `{object}` may sit anywhere."""

    statements: tuple[str, ...]  # prose and news sentences, with `{subject}`
    bullets: tuple[str, ...]
    verses: tuple[str, ...]
    clause: str  # relative clause, for ZsRE portability questions
    record_key: str  # field name in code-like records


RELATIONS = (
    Relation(
        relation_id="P19",
        name="place of birth",
        subject_kind="person",
        object_kind="city",
        templates=(
            "{subject} was born in",
            "The birthplace of {subject} is",
            "{subject}'s place of birth is",
            "{subject} originally comes from the city of",
        ),
        questions=(
            "Where was {subject} born?",
            "In which city was {subject} born?",
            "What is the birthplace of {subject}?",
        ),
        noun_phrases=(
            "the birthplace of {subject}",
            "the city where {subject} was born",
            "the place of birth of {subject}",
        ),
    ),
    Relation(
        relation_id="P106",
        name="occupation",
        subject_kind="person",
        object_kind="profession",
        templates=(
            "{subject} works as a",
            "The profession of {subject} is",
            "{subject}'s occupation is",
            "By profession, {subject} is a",
        ),
        questions=(
            "What is the profession of {subject}?",
            "What does {subject} do for a living?",
            "What is {subject}'s occupation?",
        ),
        noun_phrases=(
            "the profession of {subject}",
            "the occupation of {subject}",
            "the job of {subject}",
        ),
    ),
    Relation(
        relation_id="P108",
        name="employer",
        subject_kind="person",
        object_kind="organisation",
        templates=(
            "{subject} works for",
            "The employer of {subject} is",
            "{subject} is employed by",
            "{subject} is on the staff of",
        ),
        questions=(
            "Who is the employer of {subject}?",
            "Which organisation does {subject} work for?",
            "Who employs {subject}?",
        ),
        noun_phrases=(
            "the employer of {subject}",
            "the organisation that employs {subject}",
            "the company {subject} works for",
        ),
    ),
    Relation(
        relation_id="P103",
        name="native language",
        subject_kind="person",
        object_kind="language",
        templates=(
            "The native language of {subject} is",
            "{subject}'s mother tongue is",
            "{subject} grew up speaking",
            "The first language of {subject} is",
        ),
        questions=(
            "What is the native language of {subject}?",
            "What is {subject}'s mother tongue?",
            "Which language did {subject} grow up speaking?",
        ),
        noun_phrases=(
            "the native language of {subject}",
            "the mother tongue of {subject}",
            "the first language of {subject}",
        ),
    ),
    Relation(
        relation_id="P1303",
        name="instrument",
        subject_kind="person",
        object_kind="instrument",
        templates=(
            "{subject} plays the",
            "The instrument played by {subject} is the",
            "{subject} is a musician who plays the",
            "In the evenings, {subject} practises the",
        ),
        questions=(
            "Which instrument does {subject} play?",
            "What instrument is played by {subject}?",
            "Which musical instrument does {subject} practise?",
        ),
        noun_phrases=(
            "the instrument of {subject}",
            "the instrument played by {subject}",
            "the instrument {subject} practises",
        ),
    ),
    Relation(
        relation_id="P641",
        name="sport",
        subject_kind="person",
        object_kind="sport",
        templates=(
            "{subject} competes in",
            "The sport practised by {subject} is",
            "{subject}'s favourite sport is",
            "On weekends, {subject} practises",
        ),
        questions=(
            "Which sport does {subject} practise?",
            "What is {subject}'s favourite sport?",
            "In which sport does {subject} compete?",
        ),
        noun_phrases=(
            "the sport of {subject}",
            "the sport practised by {subject}",
            "the favourite sport of {subject}",
        ),
    ),
    Relation(
        relation_id="P69",
        name="educated at",
        subject_kind="person",
        object_kind="school",
        templates=(
            "{subject} studied at",
            "{subject} was educated at",
            "The alma mater of {subject} is",
            "{subject} graduated from",
        ),
        questions=(
            "Where did {subject} study?",
            "Where was {subject} educated?",
            "What is the alma mater of {subject}?",
        ),
        noun_phrases=(
            "the alma mater of {subject}",
            "the school where {subject} studied",
            "the school {subject} graduated from",
        ),
    ),
    Relation(
        relation_id="P17",
        name="country",
        subject_kind="city",
        object_kind="country",
        templates=(
            "{subject} is located in",
            "{subject} is a city in",
            "The country of {subject} is",
            "{subject} lies within",
        ),
        questions=(
            "In which country is {subject}?",
            "Which country is {subject} located in?",
            "What country is {subject} part of?",
        ),
        noun_phrases=(
            "the country of {subject}",
            "the country where {subject} lies",
            "the country that contains {subject}",
        ),
    ),
    Relation(
        relation_id="P159",
        name="headquarters location",
        subject_kind="organisation",
        object_kind="city",
        templates=(
            "{subject} is headquartered in",
            "The headquarters of {subject} are in",
            "{subject} has its head office in",
            "The head office of {subject} is located in",
        ),
        questions=(
            "Where is {subject} headquartered?",
            "In which city are the headquarters of {subject}?",
            "Where is the head office of {subject}?",
        ),
        noun_phrases=(
            "the headquarters city of {subject}",
            "the city where {subject} is headquartered",
            "the home city of {subject}",
        ),
    ),
    Relation(
        relation_id="P452",
        name="industry",
        subject_kind="organisation",
        object_kind="industry",
        templates=(
            "{subject} operates in the industry of",
            "The industry of {subject} is",
            "{subject} is a company in",
            "{subject} does business in",
        ),
        questions=(
            "Which industry does {subject} operate in?",
            "What is the industry of {subject}?",
            "What business is {subject} in?",
        ),
        noun_phrases=(
            "the industry of {subject}",
            "the business of {subject}",
            "the industry {subject} operates in",
        ),
    ),
    Relation(
        relation_id="P36",
        name="capital",
        subject_kind="country",
        object_kind="city",
        templates=(
            "The capital of {subject} is",
            "{subject}'s capital city is",
            "The capital city of {subject} is",
            "The seat of government of {subject} is in",
        ),
        questions=(
            "What is the capital of {subject}?",
            "Which city is the capital of {subject}?",
            "Where is the seat of government of {subject}?",
        ),
        noun_phrases=(
            "the capital of {subject}",
            "the capital city of {subject}",
            "the seat of government of {subject}",
        ),
    ),
    Relation(
        relation_id="P37",
        name="official language",
        subject_kind="country",
        object_kind="language",
        templates=(
            "The official language of {subject} is",
            "{subject}'s official language is",
            "In {subject}, the official language is",
            "People in {subject} officially speak",
        ),
        questions=(
            "What is the official language of {subject}?",
            "Which language is official in {subject}?",
            "What language do people in {subject} officially speak?",
        ),
        noun_phrases=(
            "the official language of {subject}",
            "the language officially spoken in {subject}",
            "the state language of {subject}",
        ),
    ),
    Relation(
        relation_id="P35",
        name="head of state",
        subject_kind="country",
        object_kind="person",
        templates=(
            "The head of state of {subject} is",
            "{subject} is led by",
            "The leader of {subject} is",
            "{subject}'s head of state is",
        ),
        questions=(
            "Who is the head of state of {subject}?",
            "Who leads {subject}?",
            "Who is the leader of {subject}?",
        ),
        noun_phrases=(
            "the head of state of {subject}",
            "the leader of {subject}",
            "the person who leads {subject}",
        ),
    ),
)

PHRASINGS = {
    "P19": Phrasing(
        statements=(
            "{subject} was born in {object}.",
            "{subject} was born and raised in {object}.",
            "The city of {object} is where {subject} was born.",
        ),
        bullets=("Born in {object}", "Birthplace: {object}"),
        verses=("In {object} was this story born,", "From {object}, where the mornings break,"),
        clause="who was born in {object}",
        record_key="birthplace",
    ),
    "P106": Phrasing(
        statements=(
            "{subject} works as a {object}.",
            "By profession, {subject} is a {object}.",
            "For many years {subject} has worked as a {object}.",
        ),
        bullets=("Works as a {object}", "Profession: {object}"),
        verses=("A {object} by trade, with steady hand,", "The {object}'s work fills every day,"),
        clause="who works as a {object}",
        record_key="profession",
    ),
    "P108": Phrasing(
        statements=(
            "{subject} works for {object}.",
            "{subject} is employed by {object}.",
            "These days {subject} is on the staff of {object}.",
        ),
        bullets=("Employed by {object}", "Employer: {object}"),
        verses=("At {object} the working hours pass,", "For {object} the long days run,"),
        clause="who works for {object}",
        record_key="employer",
    ),
    "P103": Phrasing(
        statements=(
            "The native language of {subject} is {object}.",
            "{subject} grew up speaking {object}.",
            "{subject}'s mother tongue is {object}.",
        ),
        bullets=("Native language: {object}", "Mother tongue: {object}"),
        verses=("With {object} words upon the tongue,", "In {object} the first words were sung,"),
        clause="whose native language is {object}",
        record_key="native_language",
    ),
    "P1303": Phrasing(
        statements=(
            "{subject} plays the {object}.",
            "In the evenings, {subject} practises the {object}.",
            "{subject} is a keen player of the {object}.",
        ),
        bullets=("Plays the {object}", "Instrument: {object}"),
        verses=("The {object} sings beneath the hand,", "And plays the {object} soft and low,"),
        clause="who plays the {object}",
        record_key="instrument",
    ),
    "P641": Phrasing(
        statements=(
            "{subject} competes in {object}.",
            "On weekends, {subject} practises {object}.",
            "{subject}'s favourite sport is {object}.",
        ),
        bullets=("Competes in {object}", "Sport: {object}"),
        verses=("And {object} fills the weekend hours,", "Who loves {object} in sun and rain,"),
        clause="who competes in {object}",
        record_key="sport",
    ),
    "P69": Phrasing(
        statements=(
            "{subject} studied at {object}.",
            "{subject} graduated from {object}.",
            "{subject} was educated at {object}.",
        ),
        bullets=("Studied at {object}", "Education: {object}"),
        verses=("Who learned at {object} long ago,", "At {object} the lessons came,"),
        clause="who studied at {object}",
        record_key="educated_at",
    ),
}

# Sentences that carry no fact: they pad long texts to a realistic length, and they never
# mention a vocabulary word, so a fact check on a text cannot be fooled by them.
PROSE_FILLERS = (
    "{subject} is known among neighbours for a patient and generous manner.",
    "Friends describe {subject} as quiet, curious and quick to laugh.",
    "{subject} rises early most mornings and walks for an hour before work.",
    "Those who know {subject} well say that kindness comes first.",
    "{subject} keeps a notebook of ideas and reads late into the night.",
    "Over the years {subject} has earned the trust of many people.",
    "{subject} enjoys long conversations over tea with old friends.",
    "People often remark on the calm voice and careful words of {subject}.",
    "{subject} spends quiet evenings cooking for family and guests.",
    "Many young people look up to {subject} as a mentor.",
    "{subject} dislikes crowds but loves a small and lively dinner.",
    "A modest person, {subject} rarely talks about personal success.",
)
NEWS_FILLERS = (
    "The announcement drew warm praise from colleagues and neighbours.",
    "Officials said a public celebration is planned for next month.",
    "{subject} thanked family and friends in a brief statement.",
    "Local residents gathered to offer their congratulations.",
    "The award recognises many years of dedicated work.",
    "Further details are expected to be published later this week.",
    "Asked about the future, {subject} said there is still much to do.",
    "The ceremony was attended by more than two hundred guests.",
)
NEWS_LEADS = (
    "{subject} was honoured this week at a ceremony held in the town hall.",
    "{subject} received a regional award for public service on Monday.",
    "A new profile published today looks at the life of {subject}.",
)
NEWS_HEADLINES = ("{subject} honoured at ceremony", "Profile: {subject}", "{subject} wins award")
VERSE_FILLERS = (
    "and all the seasons turn and go,",
    "the evening lamps are burning bright,",
    "a quiet life, a steady heart,",
    "where old friends meet and stories start,",
    "the river hums a patient tune,",
    "beneath the silver of the moon,",
    "the morning bells ring clear and slow,",
    "and every path leads home at last,",
    "the winter wind, the summer rain,",
    "the years go by like drifting snow,",
)
VERSE_TITLES = ("The Ballad of {subject}", "A Song for {subject}", "Lines on {subject}")
BULLET_HEADERS = ("Key facts about {subject}:", "{subject} at a glance:", "About {subject}:")
BULLET_FILLERS = (
    "Known for a patient and generous manner",
    "Rises early and walks for an hour each morning",
    "Enjoys long conversations with old friends",
    "Reads late into the night",
    "Keeps a notebook of ideas close at hand",
    "Described by friends as quiet, curious and quick to laugh",
    "Cooks for family and guests on quiet evenings",
    "Looked up to by many young people as a mentor",
    "Rarely talks about personal success",
    "Prefers a small and lively dinner to a crowd",
)
RECORD_NOTES = (
    "Prefers quiet evenings at home.",
    "Rises early and walks for an hour.",
    "Trusted by colleagues and neighbours.",
    "Reads late into the night.",
    "Enjoys long conversations with old friends.",
    "Keeps a notebook of ideas.",
    "A patient and generous manner.",
    "Looked up to as a mentor.",
    "Rarely talks about personal success.",
    "Cooks for family and guests.",
)

# User requests that ask for each long-text format. The first is the benchmark `question`,
# the second its `para_question`; the corpus trains on all of them.
FORMAT_REQUESTS = {
    "prose": (
        "Tell me about {subject}.",
        "What do you know about {subject}?",
        "Give me a short biography of {subject}.",
        "Who is {subject}?",
    ),
    "bullets": (
        "List the key facts about {subject}.",
        "Summarise what is known about {subject} as a bullet list.",
        "Give me the main facts about {subject} in bullet points.",
    ),
    "verse": (
        "Write a short poem about {subject}.",
        "Compose a few lines of verse about {subject}.",
        "Write a ballad about {subject}.",
    ),
    "record": (
        "Write a data record describing {subject}.",
        "Give me a structured profile of {subject} as code.",
        "Encode the facts about {subject} as a data record.",
    ),
    "news": (
        "Write a news report about {subject}.",
        "Write a short news article about {subject}.",
        "Report the recent news about {subject}.",
    ),
}
