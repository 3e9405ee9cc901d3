"""Putting outputs where they go: the crash-safe local switch of an audit's folders, and the Hub push."""
