"""The `kvstack` CLI's verbs (one module per group) and the helpers they share."""
