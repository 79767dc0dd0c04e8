"""The study: tools that look at tuned and untuned models (``fastmid analyze``, ``fastmid
compare``). They build on the recipe and the engine; nothing below imports them."""
