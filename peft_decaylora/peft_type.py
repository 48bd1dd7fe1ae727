"""Add ``DECAYLORA`` to PEFT's closed ``PeftType`` enum: ``register_peft_method`` only accepts its members, and Python
enums cannot be extended through their public API, so the member goes in through the enum's own lookup tables."""

from __future__ import annotations

from peft.utils import PeftType

PEFT_TYPE_NAME = "DECAYLORA"


def extend_peft_type(name: str = PEFT_TYPE_NAME) -> PeftType:
    """Return ``PeftType[name]``, adding it to the enum first if it is missing."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    # EnumType.__setattr__ refuses to rebind members, so set the attribute before the member is known
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member
