"""The commands: ``segtrain`` (:mod:`.train`), ``segtrain-eval`` (:mod:`.evaluate`), ``segtrain-predict``
(:mod:`.predict`), ``segtrain-export`` (:mod:`.export`), ``segtrain-info`` (:mod:`.info`) and ``segtrain-data``
(:mod:`.data`), run by :mod:`.runner` (Hydra, one-line errors, exit codes).  They read the command line, check
it and call the library; no library module imports them."""
