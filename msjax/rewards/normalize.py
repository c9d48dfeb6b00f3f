"""The original work's answer normalisations (REFERENCE 4, step 5), restated exactly.

MetaStone-S1's outcome reward calls two answers equal when, in this order:
  1. their "MATH-style" forms (`math_normal_form`) are equal, or those forms are equal after the
     "final answer" normalisation (`final_answer_form`);
  2. the final-answer forms of the raw strings are equal;
  3. the raw strings are equal;
  4. math-verify says so (done by the caller: `msjax.rewards.official`).
`strings_equivalent` is steps 1-3. Quirks are kept on purpose, so that msjax grades exactly as the
original: "and" is deleted anywhere (also inside `\\land`), a `j` becomes `i` when there is no `i`,
and a string with one `/` whose sides are not integers (e.g. "x/2") raises inside the MATH-style
form, which makes step 1 give up for that pair (steps 2-4 still run).
"""

from __future__ import annotations

import re

# --- the MATH-style form -------------------------------------------------------------------------

_MATH_REMOVED_1 = ("\\!", "\\ ")
_MATH_REMOVED_2 = ("^{\\circ}", "^\\circ", "\\$", "$", "\\text", "x\\in", "\\%", "%")
_TRAILING_TEXT_RE = re.compile(r"\\text{.*?}$")
_MBOX_RE = re.compile(r"\\mbox{.*?}")
_ZEROS_BEFORE_NON_DIGIT_RE = re.compile(r"(\d+)\.0+([^\d])")
_ZEROS_AT_END_RE = re.compile(r"(\d+)\.0+$")
_BARE_SQRT_RE = re.compile(r"\\sqrt(\w+)")


def fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`; `s` unchanged when a `\\frac`
    is followed by fewer than two characters."""
    head, *rest = s.split("\\frac")
    out = [head]
    for part in rest:
        out.append("\\frac")
        if part.startswith("{"):
            out.append(part)
        elif len(part) < 2:
            return s
        elif part[1] == "{":
            out.append("{" + part[0] + "}" + part[1:])
        else:
            out.append("{" + part[0] + "}{" + part[1] + "}" + part[2:])
    return "".join(out)


def fix_slash(s: str) -> str:
    """ "3/4" -> `\\frac{3}{4}` when both sides are integers written plainly; any other string with
    exactly one "/" whose sides are not integers raises ValueError (the original's behaviour)."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    a, b = int(parts[0]), int(parts[1])  # ValueError for "x/2": the caller's step gives up
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def math_normal_form(s: str) -> str:
    """The MATH-style string form of an answer (spacing, `\\left`/`\\right`, degrees, dollars,
    percent, `\\text`, trailing `.000`, short "x =" prefixes, bare `\\sqrt`/`\\frac` arguments,
    integer "a/b"). May raise ValueError (see `fix_slash`)."""
    s = str(s).strip().replace("\n", "").rstrip(".")
    for t in _MATH_REMOVED_1:
        s = s.replace(t, "")
    s = s.replace("\\\\", "\\").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    without_unit = _TRAILING_TEXT_RE.sub("", s).strip()
    if without_unit and without_unit != s:
        s = without_unit
    for t in _MATH_REMOVED_2:
        s = s.replace(t, "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.replace("\\cdot", "")
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    s = s.replace("+\\inity", "\\infty")
    s = s.replace("and", "").replace("\\mathbf", "")
    s = _MBOX_RE.sub("", s)
    if "j" in s and "i" not in s:
        s = s.replace("j", "i")
    s = _ZEROS_BEFORE_NON_DIGIT_RE.sub(r"\1\2", s)
    s = _ZEROS_AT_END_RE.sub(r"\1", s)
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _BARE_SQRT_RE.sub(r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    return fix_slash(fix_fracs(s))


# --- the "final answer" form ---------------------------------------------------------------------

# (before, after) replacements, in order.
_FINAL_SUBSTITUTIONS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
    ("\\le", "<"),
)
# Units, words and markup deleted, in order.
_FINAL_REMOVED = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "ft",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
    "\n",
    "\r",
    "\f",
)
# Wrappers unwrapped (the content kept), in order.
_FINAL_UNWRAP = tuple(
    re.compile(p)
    for p in (
        r"(\\text\{)\((.*?)\)(\})",
        r"(\\text\{)(.*?)(\})",
        r"(\\textbf\{)(.*?)(\})",
        r"(\\overline\{)(.*?)(\})",
        r"(\\boxed\{)(.*)(\})",
    )
)
# The last match of each, in order, replaces the answer.
_FINAL_PICK = tuple(
    re.compile(p)
    for p in (r"finalansweris(.*)", r"answer?is:?(.*)", r"oxed\{(.*?)\}", r"\$(.*?)\$")
)
_SHORT_FRAC_RE = re.compile(r"(frac)([^{])(.)")
_SHORT_SQRT_RE = re.compile(r"(sqrt)([^{])")


def final_answer_form(s: str) -> str:
    """The "final answer" form: articles, spaces, units and words removed, `\\text{}`-like
    wrappers unwrapped, "the final answer is X" / `\\boxed{X}` / `$X$` reduced to X, short
    `\\frac`/`\\sqrt` arguments braced, thousands commas of an integer dropped."""
    for before, after in _FINAL_SUBSTITUTIONS:
        s = s.replace(before, after)
    for t in _FINAL_REMOVED:
        s = s.replace(t, "")
    for pattern in _FINAL_UNWRAP:
        s = pattern.sub(r"\2", s)
    for pattern in _FINAL_PICK:
        if found := pattern.findall(s):
            s = found[-1]
    s = s.strip()
    if "rac" in s and "\\frac" not in s:
        s = s.replace("rac", "\\frac")
    s = _SHORT_FRAC_RE.sub(r"frac{\2}{\3}", s)
    s = _SHORT_SQRT_RE.sub(r"sqrt{\2}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s


def strings_equivalent(pred: str, gold: str) -> bool:
    """Steps 1-3 of the module docstring (no math-verify)."""
    try:
        a, b = math_normal_form(pred), math_normal_form(gold)
        if a == b or final_answer_form(a) == final_answer_form(b):
            return True
    except ValueError:
        pass
    return final_answer_form(pred) == final_answer_form(gold) or pred == gold
