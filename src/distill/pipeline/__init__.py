"""From a config to a finished run: settings, teacher acquisition, memory checks, the run directory,
training every model of a run and evaluating them."""
