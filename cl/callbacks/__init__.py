"""Callbacks: hooks around the run, and the built-in metrics, journal, console and checkpointing."""

from cl.callbacks.base import Callback, CallbackList
from cl.callbacks.console import ConsoleLogger
from cl.callbacks.events import EventLog

__all__ = ["Callback", "CallbackList", "ConsoleLogger", "EventLog"]
