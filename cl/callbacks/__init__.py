"""Callbacks: hooks around the run, and the built-in metrics, journal, console and checkpointing.

Loggers (``cl run --logger console,csv,tensorboard,wandb,report``) register themselves in
``cl.registry.LOGGERS`` when this package is imported.
"""

from cl.callbacks.base import Callback, CallbackList
from cl.callbacks.console import ConsoleLogger
from cl.callbacks.csv_logger import CSVLogger
from cl.callbacks.events import EventLog
from cl.callbacks.logger import LoggerWarning, RunLogger
from cl.callbacks.report import ReportWriter
from cl.callbacks.tensorboard_logger import TensorBoardLogger
from cl.callbacks.wandb_logger import WandbLogger

__all__ = [
    "CSVLogger", "Callback", "CallbackList", "ConsoleLogger", "EventLog", "LoggerWarning", "ReportWriter",
    "RunLogger", "TensorBoardLogger", "WandbLogger",
]
