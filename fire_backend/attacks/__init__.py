"""The attack zoo: one attack per module, all behind ``Attack`` (see base.py)."""

from fire_backend.attacks.badnets import BadNets
from fire_backend.attacks.base import Attack, Trigger, attack_from_spec, make_attack
from fire_backend.attacks.blended import Blended

__all__ = ["Attack", "BadNets", "Blended", "Trigger", "attack_from_spec", "make_attack"]
