"""Rendering an audit record for people: the model card, the plots and the comparison of two audits."""
