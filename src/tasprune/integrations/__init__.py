"""Integrations with other training frameworks, each an optional extra imported only when used."""
