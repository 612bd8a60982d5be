// The hint is inline, in include/prefetch.h; a C target needs one source file to build.
#include "prefetch.h"
