"""PII scrubbing: e-mail addresses, IP addresses, phone numbers and key-like secrets become placeholders.

Placeholders follow BigCode's StarCoder redaction (Li et al. 2023): `<EMAIL>`, `<IP_ADDRESS>`,
`<PHONE>`, `<SECRET>` (StarCoder writes `<KEY>`; ours is configurable). Rules, chosen so code
and prose keep their meaning:

- e-mail: `local@domain.tld` (RFC 5322's common subset).
- IP: IPv4 dotted quads and IPv6 addresses that are *public*: private, loopback, link-local,
  multicast, reserved and documentation ranges (192.0.2.0/24, 2001:db8::/32, ...) say nothing
  about a person and are kept, as are the well-known public DNS resolvers (8.8.8.8, 1.1.1.1, ...)
  — the exceptions BigCode's pipeline makes. A dotted quad inside a longer dotted run
  (a version string like 1.2.3.4.5) is not an address.
- phone: numbers written with separators, North-American `(555) 123-4567`, `555-123-4567` and
  international `+44 20 7946 0958` forms, at least 8 digits; bare digit runs are left alone
  (they are ids, constants, timestamps far more often than phone numbers).
- secrets: well-known token formats (AWS access key ids, GitHub, Slack, Google API, Stripe and
  OpenAI-style keys, JWTs, PEM private-key blocks) and values assigned to key-like names
  (`api_key = "..."`, `"password": "..."`) that look random: at least 12 characters, no spaces,
  and a Shannon entropy of at least 3.0 bits per character, so `password = "changeme"` stays.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass

from leantrain.corpus.readers import Document
from leantrain.corpus.steps import DocStep, Drop, StepStats

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                    r"[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:|:){2,7}(?::|[0-9A-Fa-f]{1,4})(?![\w:])")
_PHONE = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}"
                    r"(?![\w-]|\.\d)")
# Well-known token formats: (a literal every match contains, for a fast skip; the pattern).
_TOKENS = [
    (("AKIA", "ASIA"), re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),                   # AWS access key id
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),                               # GitHub
     re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b|\bgithub_pat_[A-Za-z0-9_]{22,255}\b")),
    (("xox",), re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,255}")),                         # Slack
    (("AIza",), re.compile(r"\bAIza[0-9A-Za-z_-]{35}")),                                  # Google API key
    (("k_live_", "k_test_"), re.compile(r"\b[sr]k_(?:live|test)_[0-9A-Za-z]{16,255}\b")),  # Stripe
    (("sk-",), re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,255}")),                 # OpenAI/Anthropic-style
    (("eyJ",), re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")),  # JWT
    (("PRIVATE KEY-----",),
     re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z]+ )*PRIVATE KEY-----")),
]
# A quoted value after `=`, `:` or `=>`; it is a secret when the name before it is key-like and it looks random.
_QUOTED = re.compile(r"(?:[:=]|=>)\s*[\"']([^\"'\s]{12,256})[\"']")
_KEY_NAME = re.compile(r"(?i)(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?key|access[_-]?token|auth[_-]?token"
                       r"|private[_-]?key|client[_-]?secret|password|passwd|token)[\"']?\s*(?:[:=]|=>)\s*[\"']$")
# Cheap tests that a document may hold a match at all (most hold none), before the full patterns run.
_MAY_EMAIL = re.compile(r"[A-Za-z0-9_%+-]@[A-Za-z0-9-]+\.")
_MAY_IPV4 = re.compile(r"\.\d{1,3}\.\d{1,3}\.")
_MAY_IPV6 = re.compile(r"::|:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")
_MAY_PHONE = re.compile(r"\d\d\d[ .-]\d\d\d")
_KEEP_IPS = frozenset({"8.8.8.8", "8.8.4.4", "1.1.1.1", "1.0.0.1", "9.9.9.9", "149.112.112.112",
                       "208.67.222.222", "208.67.220.220"})


def _entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def _public_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    if text in _KEEP_IPS:
        return False
    if ip.version == 4 and text[1] == "." and text[3] == ".":
        return False  # "7.1.4.34", "8.2.4.44": version or section numbers far more often than hosts
    return ip.is_global and not ip.is_multicast


@dataclass
class PIIScrub(DocStep):
    emails: bool = True
    ips: bool = True
    phones: bool = True
    secrets: bool = True
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP_ADDRESS>"
    phone_placeholder: str = "<PHONE>"
    secret_placeholder: str = "<SECRET>"
    min_secret_entropy: float = 3.0

    name = "pii"

    def apply(self, doc: Document) -> Document | Drop:
        return self.process(doc, StepStats(self.name))

    def scrub(self, text: str) -> tuple[str, list[str]]:
        """The text with PII replaced, and the kinds found (for the data card's counts)."""
        found: list[str] = []
        original = text
        if self.secrets:
            for literals, pattern in _TOKENS:
                if any(lit in text for lit in literals):
                    text = pattern.sub(self.secret_placeholder, text)
            if "=" in text or ":" in text:
                text = _QUOTED.sub(self._assigned, text)
            if text != original:
                found.append("pii:secret")
        if self.emails and _MAY_EMAIL.search(text):
            new = _EMAIL.sub(self.email_placeholder, text)
            if new != text:
                found.append("pii:email")
                text = new
        if self.ips:
            new = text
            if _MAY_IPV4.search(new):
                new = _IPV4.sub(lambda m: self.ip_placeholder if _public_ip(m.group(0)) else m.group(0), new)
            if _MAY_IPV6.search(new):
                new = _IPV6.sub(self._ipv6, new)
            if new != text:
                found.append("pii:ip")
                text = new
        if self.phones and _MAY_PHONE.search(text):
            new = _PHONE.sub(self.phone_placeholder, text)
            if new != text:
                found.append("pii:phone")
                text = new
        return text, found

    def _assigned(self, m: re.Match) -> str:
        value = m.group(1)
        if len(set(value)) < 6 or _entropy(value) < self.min_secret_entropy or value.startswith("<"):
            return m.group(0)
        s = m.string
        if not _KEY_NAME.search(s, max(0, m.start() - 40), m.start(1)):
            return m.group(0)
        return m.group(0)[: m.start(1) - m.start(0)] + self.secret_placeholder + m.group(0)[m.end(1) - m.start(0):]

    def _ipv6(self, m: re.Match) -> str:
        addr = m.group(0)
        if sum(1 for g in addr.split(":") if g) >= 3 and _public_ip(addr):
            return self.ip_placeholder
        return addr

    def process(self, doc: Document, stats: StepStats) -> Document | Drop:
        text, found = self.scrub(doc.text)
        if not found:
            return doc
        stats.modified.update(found)
        return Document(doc.id, text, doc.source)
