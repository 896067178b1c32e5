"""Bridges to other libraries, each imported only when used (kvpress is an optional extra)."""
