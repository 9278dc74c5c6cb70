"""Autotuning: the tile database, the tuner behind ``pit-tune``, and run-time selection."""

from .cost_model import DEFAULT_MICRO_TILE, Selection, fit_line, select_micro_tile, tuned_knobs
from .database import DatabaseError, TileDatabase, default_database_path, set_tile_database, tile_database
from .tuner import DEFAULT_EVALUATOR, Measurement, TuneReport, format_report, tune_matmul

__all__ = [
    "DEFAULT_EVALUATOR",
    "DEFAULT_MICRO_TILE",
    "DatabaseError",
    "Measurement",
    "Selection",
    "TileDatabase",
    "TuneReport",
    "default_database_path",
    "fit_line",
    "format_report",
    "select_micro_tile",
    "set_tile_database",
    "tile_database",
    "tune_matmul",
    "tuned_knobs",
]
