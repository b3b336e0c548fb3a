"""The scan coordinator (no torch, no GPU): its Celery app (``app``), the slice loop
(``coordinator``), how a manifest row becomes an image and a key (``resolver``), and
the signed completion callback (``callback``)."""
