/* Temporary: commands whose implementation lands in a later commit. */
#include "cli/cli.h"
static int pending(const char *c) { fprintf(stderr, "fluxq %s: not built yet\n", c); return EXIT_ERR; }
int cmd_quantize(int argc, char **argv) { (void)argc; (void)argv; return pending("quantize"); }
int cmd_dequantize(int argc, char **argv) { (void)argc; (void)argv; return pending("dequantize"); }
int cmd_inspect(int argc, char **argv) { (void)argc; (void)argv; return pending("inspect"); }
int cmd_bench(int argc, char **argv) { (void)argc; (void)argv; return pending("bench"); }
int cmd_demo(int argc, char **argv) { (void)argc; (void)argv; return pending("demo"); }
