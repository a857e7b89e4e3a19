"""Named exit codes of the dynvm-trace command."""

OK = 0
FAILURE = 1  # the command ran and found a problem (e.g. doctor: no usable live source)
USAGE = 2  # bad command line (click's own code for usage errors)
BAD_INPUT = 3  # a log, scenario or kernel file that cannot be parsed
NOT_PERMITTED = 4  # needs root / CAP_BPF / write permission
MISSING_FEATURE = 5  # the kernel or host lacks what the command needs (sysfs tree, tracepoint, bcc)
OUTPUT_FAILED = 6  # an output file could not be written (e.g. its disk is full)
INTERRUPTED = 130  # stopped by SIGINT before its end (output is still valid)
