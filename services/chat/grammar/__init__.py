"""Output grammars on llguidance: schema checks, grammar text, bounded compiling, per-sequence token matchers."""
