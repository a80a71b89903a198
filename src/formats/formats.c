/* Public access to the format tables as floats. */
#include "fluxq.h"
#include "formats/formats.h"

#include <pthread.h>
#include <string.h>

static float g_nf4[16], g_fp4[16], g_dyn[256];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void fill_tables(void) {
    memcpy(g_nf4, FQ_NF4_BITS, sizeof g_nf4);
    memcpy(g_fp4, FQ_FP4_BITS, sizeof g_fp4);
    memcpy(g_dyn, FQ_DYNAMIC_SIGNED_BITS, sizeof g_dyn);
}

const float *fq_quant_map(fq_quant_type t) {
    pthread_once(&g_once, fill_tables);
    return t == FQ_QUANT_FP4 ? g_fp4 : g_nf4;
}

const float *fq_dynamic_map_signed(void) {
    pthread_once(&g_once, fill_tables);
    return g_dyn;
}
