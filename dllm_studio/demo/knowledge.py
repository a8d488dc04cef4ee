"""The facts the demo model learns: a small knowledge base written as data.

Every QA item, every held-out sentence of the text suite and every code task is generated from
these tables (see `tasks.py`), so the whole curriculum is reproducible from this file.
"""

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Portugal": "Lisbon",
    "Greece": "Athens", "Austria": "Vienna", "Poland": "Warsaw", "Sweden": "Stockholm", "Norway": "Oslo",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest",
    "Belgium": "Brussels", "Egypt": "Cairo", "Kenya": "Nairobi", "Japan": "Tokyo", "China": "Beijing",
    "India": "Delhi", "Russia": "Moscow", "Canada": "Ottawa", "Mexico": "Mexico City", "Peru": "Lima",
    "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Iran": "Tehran",
    "Iraq": "Baghdad", "Turkey": "Ankara", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat",
    "Australia": "Canberra", "Argentina": "Buenos Aires", "Brazil": "Brasilia", "Colombia": "Bogota",
    "Ukraine": "Kyiv", "Romania": "Bucharest",
}

ANIMAL_CLASSES = {
    "dog": "mammal", "cat": "mammal", "horse": "mammal", "whale": "mammal", "dolphin": "mammal",
    "bat": "mammal", "lion": "mammal", "tiger": "mammal", "elephant": "mammal", "mouse": "mammal",
    "eagle": "bird", "sparrow": "bird", "penguin": "bird", "owl": "bird", "parrot": "bird",
    "ostrich": "bird", "duck": "bird", "swan": "bird", "salmon": "fish", "shark": "fish", "trout": "fish",
    "tuna": "fish", "goldfish": "fish", "cod": "fish", "snake": "reptile", "lizard": "reptile",
    "crocodile": "reptile", "turtle": "reptile", "iguana": "reptile", "frog": "amphibian",
    "toad": "amphibian", "salamander": "amphibian", "newt": "amphibian", "ant": "insect", "bee": "insect",
    "beetle": "insect", "butterfly": "insect", "mosquito": "insect", "wasp": "insect", "cricket": "insect",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "left": "right", "happy": "sad",
    "light": "dark", "open": "closed", "early": "late", "full": "empty", "hard": "soft", "high": "low",
    "long": "short", "old": "new", "rich": "poor", "strong": "weak", "thick": "thin", "wet": "dry",
    "young": "old", "loud": "quiet", "clean": "dirty", "heavy": "light", "inside": "outside", "win": "lose",
    "day": "night", "true": "false", "buy": "sell", "push": "pull", "first": "last", "near": "far",
}

COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
    "a tomato": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white", "blood": "red",
    "a carrot": "orange", "a frog": "green", "the sun": "yellow", "a strawberry": "red", "chocolate": "brown",
    "a cherry": "red", "a lime": "green", "an elephant": "grey", "a crow": "black", "a pumpkin": "orange",
    "the ocean": "blue", "a flamingo": "pink", "an eggplant": "purple", "a polar bear": "white",
    "a leaf": "green", "a fire truck": "red", "a raven": "black", "a cucumber": "green",
}

# Code tasks: (entry point, arguments, what it does, reference body, test calls with expected values).
CODE_TASKS = [
    ("larger", "a, b", "the larger of a and b", "return a if a > b else b", [("2, 5", "5"), ("-1, -4", "-1"), ("3, 3", "3")]),
    ("smaller", "a, b", "the smaller of a and b", "return a if a < b else b", [("2, 5", "2"), ("-1, -4", "-4"), ("7, 7", "7")]),
    ("add", "a, b", "the sum of a and b", "return a + b", [("2, 3", "5"), ("-1, 1", "0"), ("10, 5", "15")]),
    ("subtract", "a, b", "a minus b", "return a - b", [("5, 3", "2"), ("1, 4", "-3"), ("0, 0", "0")]),
    ("multiply", "a, b", "the product of a and b", "return a * b", [("2, 3", "6"), ("-2, 4", "-8"), ("0, 9", "0")]),
    ("square", "n", "the square of n", "return n * n", [("3", "9"), ("-4", "16"), ("0", "0")]),
    ("cube", "n", "the cube of n", "return n * n * n", [("2", "8"), ("-3", "-27"), ("1", "1")]),
    ("double", "n", "n times two", "return n * 2", [("4", "8"), ("-1", "-2"), ("0", "0")]),
    ("half", "n", "half of n", "return n / 2", [("4", "2"), ("5", "2.5"), ("0", "0")]),
    ("negate", "n", "the negative of n", "return -n", [("4", "-4"), ("-2", "2"), ("0", "0")]),
    ("absolute", "n", "the absolute value of n", "return n if n >= 0 else -n", [("-4", "4"), ("3", "3"), ("0", "0")]),
    ("is_even", "n", "True if n is even", "return n % 2 == 0", [("4", "True"), ("7", "False"), ("0", "True")]),
    ("is_odd", "n", "True if n is odd", "return n % 2 == 1", [("3", "True"), ("8", "False"), ("1", "True")]),
    ("is_positive", "n", "True if n is greater than zero", "return n > 0", [("3", "True"), ("-2", "False"), ("0", "False")]),
    ("is_negative", "n", "True if n is less than zero", "return n < 0", [("-3", "True"), ("2", "False"), ("0", "False")]),
    ("reverse", "s", "the string s reversed", "return s[::-1]", [("'abc'", "'cba'"), ("''", "''"), ("'ab'", "'ba'")]),
    ("upper", "s", "the string s in upper case", "return s.upper()", [("'abc'", "'ABC'"), ("'Hi'", "'HI'"), ("''", "''")]),
    ("lower", "s", "the string s in lower case", "return s.lower()", [("'ABC'", "'abc'"), ("'Hi'", "'hi'"), ("''", "''")]),
    ("length", "s", "the length of s", "return len(s)", [("'abc'", "3"), ("''", "0"), ("[1, 2]", "2")]),
    ("first", "xs", "the first element of the list xs", "return xs[0]", [("[4, 5]", "4"), ("['a']", "'a'"), ("[0, 1, 2]", "0")]),
    ("last", "xs", "the last element of the list xs", "return xs[-1]", [("[4, 5]", "5"), ("['a']", "'a'"), ("[0, 1, 2]", "2")]),
    ("total", "xs", "the sum of the numbers in the list xs", "return sum(xs)", [("[1, 2, 3]", "6"), ("[]", "0"), ("[-1, 1]", "0")]),
    ("biggest", "xs", "the largest number in the list xs", "return max(xs)", [("[1, 5, 3]", "5"), ("[-2, -7]", "-2"), ("[4]", "4")]),
    ("smallest", "xs", "the smallest number in the list xs", "return min(xs)", [("[1, 5, 3]", "1"), ("[-2, -7]", "-7"), ("[4]", "4")]),
    ("count", "xs", "the number of elements in the list xs", "return len(xs)", [("[1, 5, 3]", "3"), ("[]", "0"), ("['a']", "1")]),
    ("average", "xs", "the mean of the numbers in the list xs", "return sum(xs) / len(xs)", [("[1, 2, 3]", "2"), ("[4]", "4"), ("[1, 2]", "1.5")]),
    ("sorted_list", "xs", "the list xs sorted in increasing order", "return sorted(xs)", [("[3, 1, 2]", "[1, 2, 3]"), ("[]", "[]"), ("[5, 5, 1]", "[1, 5, 5]")]),
    ("reversed_list", "xs", "the list xs in reverse order", "return xs[::-1]", [("[1, 2, 3]", "[3, 2, 1]"), ("[]", "[]"), ("['a', 'b']", "['b', 'a']")]),
    ("contains", "xs, x", "True if x is in the list xs", "return x in xs", [("[1, 2], 2", "True"), ("[1, 2], 5", "False"), ("[], 0", "False")]),
    ("is_empty", "xs", "True if the list xs is empty", "return len(xs) == 0", [("[]", "True"), ("[1]", "False"), ("[0, 0]", "False")]),
    ("greet", "name", "the string 'Hello, ' followed by name", "return 'Hello, ' + name", [("'Ann'", "'Hello, Ann'"), ("''", "'Hello, '"), ("'Bo'", "'Hello, Bo'")]),
    ("repeat", "s, n", "the string s repeated n times", "return s * n", [("'ab', 2", "'abab'"), ("'x', 0", "''"), ("'z', 3", "'zzz'")]),
    ("count_char", "s, c", "how many times the character c occurs in s", "return s.count(c)", [("'banana', 'a'", "3"), ("'abc', 'z'", "0"), ("'', 'a'", "0")]),
    ("is_palindrome", "s", "True if the string s reads the same backwards", "return s == s[::-1]", [("'abba'", "True"), ("'abc'", "False"), ("''", "True")]),
    ("remainder", "a, b", "the remainder of a divided by b", "return a % b", [("7, 3", "1"), ("6, 3", "0"), ("5, 7", "5")]),
    ("power", "a, b", "a raised to the power b", "return a ** b", [("2, 3", "8"), ("5, 0", "1"), ("3, 2", "9")]),
    ("is_divisible", "a, b", "True if a is divisible by b", "return a % b == 0", [("6, 3", "True"), ("7, 2", "False"), ("0, 5", "True")]),
    ("evens", "xs", "the even numbers of the list xs", "return [x for x in xs if x % 2 == 0]", [("[1, 2, 3, 4]", "[2, 4]"), ("[1, 3]", "[]"), ("[]", "[]")]),
    ("squares", "xs", "the squares of the numbers in the list xs", "return [x * x for x in xs]", [("[1, 2, 3]", "[1, 4, 9]"), ("[]", "[]"), ("[-2]", "[4]")]),
    ("join_words", "words", "the words in the list words joined by spaces", "return ' '.join(words)", [("['a', 'b']", "'a b'"), ("[]", "''"), ("['hi']", "'hi'")]),
]
