"""Upsampler emulator: `create_app(api_key, ...)` returns a FastAPI app speaking Upsampler's wire format."""

from emulator.app import Emulator, Faults, create_app

__all__ = ["Emulator", "Faults", "create_app"]
