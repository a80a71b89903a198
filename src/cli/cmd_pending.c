/* Temporary: commands whose implementation lands in a later commit. */
#include "cli/cli.h"
int cmd_bench(int argc, char **argv) { (void)argc; (void)argv; fprintf(stderr, "fluxq bench: not built yet\n"); return EXIT_ERR; }
