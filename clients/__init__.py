"""Clients for FIRE-protected models served by Triton (gRPC and HTTP)."""

from clients.evaluate import evaluate_images, evaluate_served
from clients.triton_client import FireClient, load_images

__all__ = ["FireClient", "evaluate_images", "evaluate_served", "load_images"]
