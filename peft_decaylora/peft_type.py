"""Add ``DECAYLORA`` to PEFT's closed ``PeftType`` enum.

PEFT's ``register_peft_method`` only accepts names that are already members of ``PeftType``, and Python enums
cannot be extended through their public API. This module adds the member through the enum's own lookup tables and
then checks every way PEFT looks a type up, so a change in PEFT or Python fails loudly at import instead of
silently later.
"""

from __future__ import annotations

from peft.utils import PeftType

PEFT_TYPE_NAME = "DECAYLORA"


def extend_peft_type(name: str = PEFT_TYPE_NAME) -> PeftType:
    """Return ``PeftType[name]``, adding it to the enum first if it is missing."""
    if name in PeftType.__members__:
        return PeftType[name]

    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    # EnumType.__setattr__ refuses to rebind members, so set the attribute before the member is known.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)

    checks = {
        "PeftType[name]": lambda: PeftType[name] is member,
        "PeftType(value)": lambda: PeftType(name) is member,
        "getattr(PeftType, name)": lambda: getattr(PeftType, name) is member,
        "name in list(PeftType)": lambda: name in list(PeftType) and member in list(PeftType),
        "member == value": lambda: member == name and isinstance(member, str),
    }
    failed = [label for label, check in checks.items() if not _safe(check)]
    if failed:
        raise RuntimeError(
            f"peft_decaylora could not add {name!r} to peft.utils.PeftType (failed: {', '.join(failed)}). "
            "The installed PEFT or Python changed how PeftType works; please report the PEFT and Python versions."
        )
    return member


def _safe(check) -> bool:
    try:
        return bool(check())
    except Exception:
        return False
