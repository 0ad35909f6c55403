"""Taking over the dropout of models built elsewhere (torch, transformers, timm) as sites.

:func:`convert` is ``ds.convert``; :mod:`~dropsplit.integrations.transformers` and
:mod:`~dropsplit.integrations.timm` hold what it does to those libraries' attention, and are
imported only when a model needs them (``import dropsplit`` imports neither library).
"""

from dropsplit.integrations.convert import ConvertReport, ExampleDropout, convert

__all__ = ["ConvertReport", "ExampleDropout", "convert"]
