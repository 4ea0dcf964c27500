"""The attack zoo: one attack per module, all behind ``Attack`` (see base.py)."""

from fire_backend.attacks.all_to_all import BadNetsAllToAll
from fire_backend.attacks.badnets import BadNets
from fire_backend.attacks.base import Attack, Trigger, attack_from_spec, make_attack
from fire_backend.attacks.blended import Blended
from fire_backend.attacks.custom import Custom
from fire_backend.attacks.sig import SIG
from fire_backend.attacks.trojan import Trojan
from fire_backend.attacks.wanet import WaNet

__all__ = [
    "SIG",
    "Attack",
    "BadNets",
    "BadNetsAllToAll",
    "Blended",
    "Custom",
    "Trigger",
    "Trojan",
    "WaNet",
    "attack_from_spec",
    "make_attack",
]
