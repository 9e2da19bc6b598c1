"""The slide stage: open a slide (`reader`), find its tissue (`tissue`), normalise its stain (`stain`)."""
