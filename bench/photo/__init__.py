"""Photo studies: how resizing pipelines move real photographs relative to CIFAKE (study)."""
