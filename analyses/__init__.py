"""Registered analyses: one module each, a ``<Name>Params`` model and one ``@analysis`` function."""
