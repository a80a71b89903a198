/* Shared bits of the fluxq command: exit codes, option parsing, progress. */
#ifndef FQ_CLI_H
#define FQ_CLI_H

#include "fluxq.h"

#include <stdbool.h>
#include <stdio.h>

enum { EXIT_OK = 0, EXIT_ERR = 1, EXIT_USAGE = 2 };

/* Prints "fluxq <cmd>: <message>" for a failed status and returns EXIT_ERR. */
int cli_fail(fq_ctx *ctx, const char *cmd, fq_status s);
/* Prints a usage error and returns EXIT_USAGE. */
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Option scanning: `--name value` or `--name=value`. Returns the value and
 * advances *i, or NULL if argv[*i] is not that option. Missing value: *missing = true. */
const char *cli_opt(int argc, char **argv, int *i, const char *name, bool *missing);
bool cli_wants_help(int argc, char **argv);
bool cli_parse_i64(const char *s, long long *out);

/* Progress on stderr: "label  [done/total]" rewritten in place when stderr is a terminal. */
void cli_progress(const char *label, long long done, long long total);
void cli_progress_done(void);

/* Log callback printing warnings and errors to stderr. */
void cli_log(void *user, fq_log_level lvl, const char *msg);

int cmd_quantize(int argc, char **argv);
int cmd_dequantize(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_demo(int argc, char **argv);
int cmd_forward(int argc, char **argv);
int cmd_audit(int argc, char **argv);

#endif
