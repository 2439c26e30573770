"""Reading the policy file (TOML) at start-up. An invalid file stops start-up, naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

from app.domain.policy import Policy, PolicyError, parse_policy
from app.domain.rollout import rollout_policy

DEFAULT_POLICY = Path(__file__).parent / "policy" / "default.toml"


class PolicyFileError(Exception):
    """The policy file cannot be used; the message names the file, the key and the problem."""


def load_policy(path: str | Path | None = None) -> Policy:
    file = Path(path) if path else DEFAULT_POLICY
    try:
        # utf-8-sig: a BOM (Notepad and other Windows editors write one) is read as none, where TOML
        # saw a stray character: "Invalid statement (at line 1, column 1)" for a file that looks right.
        data = tomllib.loads(file.read_text(encoding="utf-8-sig"))
    except FileNotFoundError as exc:
        raise PolicyFileError(f"policy file {file} (DUNNING_POLICY) does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:  # a directory, unreadable, not UTF-8 text
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PolicyFileError(f"policy file {file} (DUNNING_POLICY) cannot be read: {reason}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(f"policy file {file} is not valid TOML: {exc}") from exc
    try:
        policy = parse_policy(data)
        rollout_policy(policy.extra)  # its own section, checked now too: not first by the gate task, 5 minutes in
    except PolicyError as exc:
        raise PolicyFileError(f"policy file {file}: {exc}") from exc
    return policy
