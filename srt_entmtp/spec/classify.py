"""A cheap rule-based task classifier for picking a tree family from the prompt.

It runs once per request at admission, so it must cost microseconds, not a model call. Rules are
checked in order and the first match wins:

1. code    - a code fence, code-looking syntax (`def f(`, `#include`, `=>`, `x.y(`, `const x`,
             `SELECT ... FROM`, HTML tags), "write/implement ... function|code|script", or the
             name of a language or tool (python, javascript, SQL, HTML, React, API, git, ...).
2. writing - a request for fiction or verse: "write|compose|tell|give ... story|poem|song|
             lyrics|haiku|novel|...", or "writing prompt".
3. math    - a short prompt (< 1200 chars) with a number (digit or number word), a question
             ("?", how many/much, what is, find, calculate, solve, ...) and a quantity cue
             (total, each, per, percent, $, cost, times, hours, ...): word problems.
4. writing - a fiction word without the imperative (story, poem, fiction, novel, ...).
5. code    - two or more distinct programming words (function, algorithm, database, array, ...).
6. chat    - everything else.

Families only change which tree set the policy draws from, so a wrong guess costs speed, never
correctness. Its measured accuracy per prompt file is in docs/tree_library.md.
"""
from __future__ import annotations

import re

TASK_FAMILIES = ("code", "math", "chat", "writing", "general")

_CODE_SYNTAX = re.compile(
    r"```|\bdef \w+\s*\(|#include\b|console\.log|=>|->|\bimport \w+|\bfrom \w+ import\b|;\s*$|"
    r"\bSELECT\b[\s\S]*\bFROM\b|</?(div|span|html|body|script|p|a|ul|li|table|form|input|button)\b[^>]*>|"
    r"\bfunction\s*\w*\s*\(|\w+\.\w+\(|\w+\(\)|\bclass \w+[:({]|\{\s*$|\bvar \w+|\bconst \w+|\blet \w+ =|"
    r"\b(write|implement|create|generate)\b[^.?!\n]{0,30}\b(function|code|program|script|class|method)\b",
    re.MULTILINE | re.IGNORECASE,
)
_CODE_NAMES = re.compile(
    r"\b(python|javascript|typescript|java|c\+\+|c#|golang|rust|kotlin|swift|php|ruby|perl|bash|powershell|"
    r"sql|mysql|postgres\w*|mongodb|html|css|json|yaml|regex|react|angular|vue|node\.?js|django|flask|"
    r"api|sdk|docker|kubernetes|npm|pip|git|github|pandas|numpy|tensorflow|pytorch|aws|linux|excel formula|"
    r"jquery|spring boot|laravel|unity|graphql|webpack|nextjs|next\.js)\b",
    re.IGNORECASE,
)
_CODE_WORDS = re.compile(
    r"\b(function|method|algorithm|implement\w*|program|programming|code|coding|script|compile\w*|debug\w*|"
    r"bug|class|variable|array|linked list|binary tree|recursion|library|framework|database|query|"
    r"backend|frontend|endpoint|snippet|dataframe|unit test|string|integer|loop|parameter|syntax)\b",
    re.IGNORECASE,
)
_WRITING_ASK = re.compile(
    r"\b(write|compose|craft|create|tell|give)\b[^.?!\n]{0,40}"
    r"\b(story|stories|poem|poetry|fiction|novel|fairy tale|fable|tale|haiku|limerick|sonnet|lyrics|"
    r"song|screenplay|verse|rap)\b|\bwriting prompt\b",
    re.IGNORECASE,
)
_WRITING_WORDS = re.compile(
    r"\b(short story|story|stories|poem|poetry|fiction|fictional|novel|fairy tale|fable|narrative|"
    r"haiku|limerick|sonnet|lyrics|screenplay)\b",
    re.IGNORECASE,
)
_NUMBER = re.compile(
    r"\d|\b(one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|forty|fifty|"
    r"hundred|thousand|half|twice|thrice|double|triple|dozen)\b",
    re.IGNORECASE,
)
_MATH_ASK = re.compile(
    r"\?|\b(how many|how much|how long|how far|how old|how tall|what is|what was|what will|what's|find|"
    r"calculate|compute|solve|determine|evaluate|simplify|prove)\b",
    re.IGNORECASE,
)
_MATH_CUES = re.compile(
    r"\b(how many|how much|total|altogether|in all|percent|percentage|average|each|per|remaining|left|"
    r"more than|less than|fewer|times|twice|half|equation|integer|fraction|probability|sum|product|"
    r"ratio|area|perimeter|volume|cost|costs|price|spent|spend|earn\w*|paid|pays|profit|older|younger|"
    r"taller|heavier|lighter|speed|rate|inches|feet|pounds|miles|hours|minutes|days|weeks)\b|[$%=+×÷^]",
    re.IGNORECASE,
)


def _looks_math(text: str) -> bool:
    # word problems are short; long prompts mention numbers and "each" for other reasons
    return len(text) < 1200 and bool(_NUMBER.search(text) and _MATH_ASK.search(text) and _MATH_CUES.search(text))


def classify_task(prompt: str) -> str:
    """One of "code", "math", "writing", "chat" for a first user turn (see module docstring)."""
    text = prompt or ""
    if _CODE_SYNTAX.search(text) or _CODE_NAMES.search(text):
        return "code"
    if _WRITING_ASK.search(text):
        return "writing"
    if _looks_math(text):
        return "math"
    if _WRITING_WORDS.search(text):
        return "writing"
    if len({m.lower() for m in _CODE_WORDS.findall(text)}) >= 2:
        return "code"
    return "chat"
