"""What the peer runners share: timed repeats of one setting and the result file (standard library and numpy
only, so that it imports in the peers' own environment)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings

import numpy as np


def repeat(run, data, setting, repeats, *, quiet_stdout=False):
    """Call ``run()`` ``repeats`` times (at least once) with warnings (and, if asked, standard output) silenced.

    ``run`` returns a tuple whose second item is the dict of stage times (s). Every repeat's times go to
    standard error; a pipeline that changed ``data`` (so that the repeats would differ) is an error.
    Returns the last call's tuple, the times of every repeat and their medians.
    """
    pristine = data.copy()
    runs = []
    for _ in range(max(1, repeats)):
        with warnings.catch_warnings(), (contextlib.redirect_stdout(io.StringIO()) if quiet_stdout
                                         else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            out = run()
        runs.append(out[1])
        if not np.array_equal(data, pristine):
            raise RuntimeError("the pipeline wrote into the input array; repeats would not be identical")
        print(f"{setting}: " + ", ".join(f"{k} {v:.3f} s" for k, v in out[1].items()), file=sys.stderr, flush=True)
    medians = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    return out, runs, medians


def record(result, output, setting, info, runs, medians):
    """Add one setting's timings to ``result`` and rewrite ``output``/result.json."""
    result["settings"][setting] = {"info": info, "timings": runs, "median": medians}
    with open(os.path.join(output, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
