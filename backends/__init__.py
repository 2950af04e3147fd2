"""Model card, engines, manager and cost model. Nothing here imports torch or textual at module level."""
