"""MEMIT edits, covariance statistics, snapshot/restore, and the ripple they cause on every piece."""
