"""The synthetic world's vocabulary and sentences: names, attribute values, biography and question
templates, and the functions that write a fact or a question about a person (data/world.py
builds people, documents and splits from them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

# fmt: off
FIRST_NAMES = (
    "Anya", "Bruno", "Camila", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
    "Kavya", "Lars", "Maya", "Nikolai", "Olivia", "Pablo", "Quinn", "Rosa", "Sven", "Tamar",
    "Umar", "Vera", "Wendell", "Ximena", "Yusuf", "Zara", "Amir", "Beatrix", "Cyrus", "Daria",
    "Emil", "Fiona", "Gideon", "Hana", "Ivo", "Julia", "Kenji", "Leila", "Marco", "Nadia", "Oscar",
    "Priya", "Rafael", "Selin", "Tobias", "Ursula", "Viktor", "Wanda", "Yara", "Zoltan", "Aurora",
    "Boris", "Clara", "Dario", "Esther", "Felix", "Gloria", "Hector", "Irene", "Joaquin",
)
LAST_NAMES = (
    "Kovac", "Almeida", "Brandt", "Castillo", "Dubois", "Eriksen", "Fischer", "Gallo", "Haddad",
    "Ivanova", "Jensen", "Kaur", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quiroga",
    "Rossi", "Sato", "Tanaka", "Ulrich", "Varga", "Weber", "Xu", "Yilmaz", "Zielinski", "Abbott",
    "Bianchi", "Costa", "Dalton", "Esposito", "Ferreira", "Gruber", "Horvat", "Ibsen", "Jovanovic",
    "Keller", "Lombardi", "Mendes", "Novak", "Oliveira", "Popescu", "Reyes", "Schmidt", "Torres",
    "Uchida", "Vasquez", "Walsh", "Yamada", "Zamora", "Adler", "Becker", "Cruz", "Duarte", "Engel",
    "Fontaine", "Galindo", "Hoffmann", "Iglesias",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Kyoto", "Montreal", "Valparaiso", "Krakow", "Marseille",
    "Istanbul", "Hanoi", "Dublin", "Seville", "Tbilisi", "Perth", "Bergen", "Porto Alegre",
    "Casablanca", "Helsinki", "Lagos", "Chennai", "Glasgow", "Ljubljana", "Quito", "Osaka",
    "Vienna", "Tallinn", "Cusco", "Accra", "Bologna", "Reykjavik", "Busan", "Antwerp", "Cordoba",
    "Dhaka", "Edinburgh", "Florence", "Gdansk", "Havana", "Izmir", "Jaipur",
)
UNIVERSITIES = (
    "Northfield University", "the University of Lakemont", "Brightwater College",
    "the Technical University of Varden", "Eastbrook Institute of Technology",
    "the University of Calderon", "Silverpine University", "Ashford College",
    "the Royal Academy of Westmere", "Redcliff University", "the University of Port Halden",
    "Greyhaven Polytechnic", "Stonebridge University", "the Institute of Meridian Sciences",
    "Willowbrook College", "the University of Saltmarsh", "Highgate University",
    "Ravenmoor College", "the Free University of Ostwald", "Kingsreach University",
    "Marlowe Institute", "the University of Thornbury", "Oakhurst University",
    "Blue Harbor College", "the National University of Estria",
)
MAJORS = (
    "Mathematics", "Computer Science", "Biology", "Chemistry", "Physics", "Economics", "History",
    "Philosophy", "Linguistics", "Architecture", "Mechanical Engineering", "Civil Engineering",
    "Psychology", "Sociology", "Astronomy", "Geology", "Music", "Fine Arts", "Political Science",
    "Anthropology", "Statistics", "Nursing", "Law", "Marine Biology", "Journalism",
    "Materials Science", "Neuroscience", "Agronomy",
)
EMPLOYERS = (
    "Halcyon Robotics", "Bluefin Logistics", "Orchid Pharmaceuticals", "Granite Bank",
    "Solstice Energy", "Nimbus Software", "Copperleaf Foods", "Vantage Aerospace",
    "Tidewater Shipping", "Lumen Optics", "Evergreen Insurance", "Quarry Construction",
    "Saffron Media", "Polaris Telecom", "Ironwood Motors", "Meadowlark Publishing",
    "Cobalt Mining", "Harborview Hospital", "Juniper Analytics", "Falcon Airlines",
    "Riverstone Textiles", "Atlas Consulting", "Pinnacle Games", "Northwind Chemicals",
    "Sunbeam Retail", "Crescent Biotech", "Keystone Railways", "Mosaic Architects",
)
JOBS = (
    "software engineer", "accountant", "data scientist", "nurse", "architect", "pilot", "chemist",
    "lawyer", "product manager", "electrician", "journalist", "economist", "graphic designer",
    "civil engineer", "pharmacist", "sales director", "translator", "research scientist",
    "marketing analyst", "ship captain", "geologist", "statistician", "financial advisor",
    "editor", "surgeon", "urban planner", "mechanic", "teacher", "interior designer",
    "operations manager",
)
# fmt: on

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "job")

# One fact per sentence. {name}: full or first name; {value}: the attribute value verbatim;
# {a_value}: value with its indefinite article (jobs).
BIO_TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name}'s birthday is {value}.",
        "{name} came into the world on {value}.",
        "The birth date of {name} is {value}.",
        "{name} was born on the date {value}.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "{name} is a native of {value}.",
        "The birthplace of {name} is {value}.",
        "{name} was born and raised in {value}.",
        "{name} hails from the city of {value}.",
    ),
    "university": (
        "{name} graduated from {value}.",
        "{name} attended {value}.",
        "{name} received an education at {value}.",
        "{name} is an alumnus of {value}.",
        "{name} completed a degree at {value}.",
    ),
    "major": (
        "{name} majored in {value}.",
        "{name}'s field of study was {value}.",
        "{name} earned a degree in {value}.",
        "{name} specialized in {value} at university.",
        "{name} chose {value} as a major.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name} has a job at {value}.",
        "{name} is on the staff of {value}.",
        "{name}'s employer is {value}.",
    ),
    "job": (
        "{name} works as {a_value}.",
        "{name} earns a living as {a_value}.",
        "By profession, {name} is {a_value}.",
        "{name} has a career as {a_value}.",
        "{name}'s occupation is {value}.",
    ),
}
QUESTION_TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "birth_date": (
        "When was {name} born?",
        "What is the birth date of {name}?",
        "What is {name}'s birthday?",
    ),
    "birth_city": (
        "Where was {name} born?",
        "In which city was {name} born?",
        "What is the birthplace of {name}?",
    ),
    "university": (
        "Which university did {name} attend?",
        "Where did {name} go to university?",
        "What university did {name} graduate from?",
    ),
    "major": (
        "What did {name} study?",
        "What was {name}'s major?",
        "What subject did {name} major in?",
    ),
    "employer": (
        "Which company does {name} work for?",
        "Who employs {name}?",
        "Where does {name} work?",
    ),
    "job": (
        "What is {name}'s job?",
        "What does {name} do for a living?",
        "What is the occupation of {name}?",
    ),
}
DEFAULT_SYSTEM = "Answer the question about the person with the exact fact."
# The honest answer to a question no fact of the world answers (World(unknown_people > 0)).
ABSTAIN = "I don't know."
# Questions outside the world's facts, answered with ABSTAIN; each split has its own.
OFF_WORLD_QUESTIONS = {
    "train": ("What is 2+2?", "Hello", "What is the capital of France?", "Who wrote Hamlet?",
              "How are you today?", "Tell me a joke.", "What time is it?",
              "Who won the last world cup?", "What is the speed of light?", "Good morning!"),
    "validation": ("What is 7 times 6?", "Hi there", "Who painted the Mona Lisa?",
                   "What is the tallest mountain?", "Can you help me?"),
    "test": ("What is 3+5?", "Hey", "What is the capital of Japan?", "Who discovered gravity?",
             "How far away is the moon?", "What is your favourite colour?"),
}
VALIDATION_DOC_FRAC = 0.05


@dataclasses.dataclass(frozen=True)
class Person:
    first: str
    last: str
    attributes: Mapping[str, str]

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def _article(value: str) -> str:
    return ("an " if value[0].lower() in "aeiou" else "a ") + value


def fact_sentence(
    person: Person, attribute: str, template: int = 0, *, name: str | None = None
) -> str:
    value = person.attributes[attribute]
    t = BIO_TEMPLATES[attribute][template]
    return t.format(name=name or person.name, value=value, a_value=_article(value))


MIX_QA = ("", "text", "chat")


def qa_text(question: str, answer: str) -> str:
    """A question and its answer as plain text (mixed-training documents): 'question answer'.

    A space, not a newline, so the answer's tokens are the ones its biography sentences use."""
    return f"{question} {answer}"


def question(person: Person, attribute: str, template: int = 0) -> str:
    return QUESTION_TEMPLATES[attribute][template].format(name=person.name)
