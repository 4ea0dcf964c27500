"""The attack zoo: one attack per module, all behind ``Attack`` (see base.py)."""

from zoo.attacks.all_to_all import BadNetsAllToAll
from zoo.attacks.badnets import BadNets
from zoo.attacks.base import Attack, Trigger, attack_from_spec, make_attack
from zoo.attacks.blended import Blended
from zoo.attacks.custom import Custom, resolve_trigger_files
from zoo.attacks.sig import SIG
from zoo.attacks.trojan import Trojan
from zoo.attacks.wanet import WaNet

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
    "resolve_trigger_files",
]
