"""Everything that touches vLLM. Only :mod:`.compat` imports vLLM at module level."""
