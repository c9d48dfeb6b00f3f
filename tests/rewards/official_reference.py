"""A plain, line-by-line re-statement of the original's math reward (MetaStone-S1,
verl/utils/reward_score/math_v2.py: compute_score), written independently of msjax.rewards so the
tests compare two separate readings of the rule. Straightforward on purpose: no shared helpers.
"""

import re

from math_verify import parse, verify

EOS = "<｜end▁of▁sentence｜>"


def split_off_response(text, manager):
    # (answer tail or None, the response string the format check looks at)
    if "Assistant:" in text:
        resp = text.split("Assistant:", 1)[1]
    elif "<|im_start|>assistant" in text:
        resp = text.split("<|im_start|>assistant", 1)[1]
    elif "<｜Assistant｜>" in text:
        resp = text.split("<｜Assistant｜>", 1)[1]
    elif manager == "prime":
        resp = text
    else:
        return None, text
    if "</think>" not in resp:
        return None, resp
    tail = resp.split("</think>")[-1]
    tail = tail.lstrip()
    while tail and tail[-1] in set(EOS):
        tail = tail[:-1]
    return tail, resp


def format_is_valid(resp):
    ok = True
    first = {}
    for tag in ("<think>", "</think>"):
        if resp.count(tag) != 1:
            ok = False
        first[tag] = resp.find(tag)
    if first["<think>"] > first["</think>"]:
        ok = False
    return ok


def boxed_content(s):
    i = s.rfind("\\boxed")
    if i == -1:
        i = s.rfind("\\fbox")
    if i == -1:
        return None
    level = 0
    close = -1
    j = i
    while j < len(s):
        if s[j] == "{":
            level = level + 1
        if s[j] == "}":
            level = level - 1
            if level == 0:
                close = j
                break
        j = j + 1
    if close == -1:
        return None
    whole = s[i : close + 1]
    if whole[:7] != "\\boxed{" or whole[-1] != "}":
        return None
    inside = whole[7:-1]
    m = re.match(r"^\{(.*)\}$", inside)
    if m is not None:
        inside = m.group(1)
    return inside


def frac_fix(s):
    pieces = s.split("\\frac")
    result = pieces[0]
    for piece in pieces[1:]:
        result = result + "\\frac"
        if len(piece) > 0 and piece[0] == "{":
            result = result + piece
            continue
        if len(piece) < 2:
            return s
        if piece[1] != "{":
            result = result + "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
        else:
            result = result + "{" + piece[0] + "}" + piece[1] + piece[2:]
    return result


def slash_fix(s):
    if s.count("/") != 1:
        return s
    left, right = s.split("/")
    n, d = int(left), int(right)  # may raise ValueError, as the original does
    if s != str(n) + "/" + str(d):
        return s
    return "\\frac{" + str(n) + "}{" + str(d) + "}"


def strip_v2(s):
    s = str(s).strip()
    s = s.replace("\n", "")
    s = s.rstrip(".")
    s = s.replace("\\!", "")
    s = s.replace("\\ ", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac")
    s = s.replace("dfrac", "frac")
    s = s.replace("\\left", "")
    s = s.replace("\\right", "")
    t = re.sub(r"\\text{.*?}$", "", s).strip()
    if t != "" and t != s:
        s = t
    s = s.replace("^{\\circ}", "")
    s = s.replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = s.replace("$", "")
    s = s.replace("\\text", "")
    s = s.replace("x\\in", "")
    s = s.replace("\\%", "")
    s = s.replace("%", "")
    s = s.replace(" .", " 0.")
    s = s.replace("{.", "{0.")
    s = s.replace("\\cdot", "")
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    s = s.replace("+\\inity", "\\infty")
    s = s.replace("and", "")
    s = s.replace("\\mathbf", "")
    s = re.sub(r"\\mbox{.*?}", "", s)
    if "j" in s and "i" not in s:
        s = s.replace("j", "i")
    s = re.sub(r"(\d+)\.0+([^\d])", r"\1\2", s)
    s = re.sub(r"(\d+)\.0+$", r"\1", s)
    if s == "":
        return s
    if s[0] == ".":
        s = "0" + s
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = frac_fix(s)
    s = slash_fix(s)
    return s


SUBS = [
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
]
DROP = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
    "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
    "\n", "\r", "\f",
]  # fmt: skip


def final_norm(s):
    for a, b in SUBS:
        s = s.replace(a, b)
    for a in DROP:
        s = s.replace(a, "")
    s = re.sub(r"(\\text\{)\((.*?)\)(\})", r"\2", s)
    s = re.sub(r"(\\text\{)(.*?)(\})", r"\2", s)
    s = re.sub(r"(\\textbf\{)(.*?)(\})", r"\2", s)
    s = re.sub(r"(\\overline\{)(.*?)(\})", r"\2", s)
    s = re.sub(r"(\\boxed\{)(.*)(\})", r"\2", s)
    for pat in (r"finalansweris(.*)", r"answer?is:?(.*)", r"oxed\{(.*?)\}", r"\$(.*?)\$"):
        hits = re.findall(pat, s)
        if len(hits) > 0:
            s = hits[-1]
    s = s.strip()
    if "rac" in s and "\\frac" not in s:
        s = s.replace("rac", "\\frac")
    s = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", s)
    s = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s


def equivalent(a, b):
    try:
        x, y = strip_v2(a), strip_v2(b)
        if x == y:
            return True
        if final_norm(x) == final_norm(y):
            return True
    except Exception:
        pass
    try:
        if final_norm(a) == final_norm(b):
            return True
    except Exception:
        pass
    if a == b:
        return True
    return bool(verify(parse(a), parse(b)))


def reference_reward(text, gold, manager="naive"):
    tail, resp = split_off_response(text, manager)
    fmt_ok = format_is_valid(resp) if manager == "naive" else True
    if not fmt_ok or not tail:
        return 0.0
    pred = boxed_content(tail)
    if not pred:
        pred = tail
    if equivalent(pred, gold):
        return 1.0
    if EOS not in text:
        return 0.1
    return 0.0
