"""The params layer: one typed, validated config per process (sections, loading, overrides,
refusal messages)."""
