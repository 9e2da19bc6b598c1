"""Model maps -> instance labels (`watershed`), label-array helpers, and one polygon +
morphometry row per nucleus (`morphometry`)."""
