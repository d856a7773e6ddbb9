/*
    The inputs the module specs give the steps of their setup chains (nf-test's `libDir`, tests/lib): each is the
    Nextflow code of a `process { }` block, so that every spec builds its chain from the bundled data the same way.
    Steps are chained as in main.nf; the options of each step come from tests/config/tiny.config.
*/
class Chain {

    // PREPARE: the bundled mixology subset (400 cells, 5 cell lines x 2 protocols), held out 80 test cells
    static final String PREPARE = '''
        def h5ad = "${projectDir}/assets/test_data/mixology.h5ad"
        input[0] = [
            [ id:'mixology', condition_keys:'cell_line;protocol' ],
            [ file(h5ad, checkIfExists: true) ],
            [ [ h5ad: h5ad, split: 'all', batch: '' ] ],
        ]
    '''

    static final String TOKENIZE = '''
        input[0] = PREPARE.out.h5ad
        input[1] = []
    '''

    static final String TRAIN_VAE = '''
        input[0] = TOKENIZE.out.tokens
    '''

    static final String ENCODE = '''
        input[0] = TRAIN_VAE.out.vae.join(TOKENIZE.out.tokens)
    '''

    static final String TRAIN_PRIOR = '''
        input[0] = ENCODE.out.latents
    '''

    static final String BUNDLE = '''
        input[0] = TRAIN_VAE.out.vae.join(TRAIN_PRIOR.out.prior)
    '''

    // SAMPLE tasks like the 80 test cells: `shards` is a Groovy list of [replicate, start, stop]
    static String sample(String shards) {
        return """
        input[0] = BUNDLE.out.model
            .join(PREPARE.out.h5ad.map { meta, _train, test -> [meta, test] })
            .flatMap { meta, model, test -> ${shards}.collect { r, a, b -> [meta, model, test, [like: true], r, a, b] } }
        """
    }

    static final String GATHER = '''
        input[0] = SAMPLE.out.h5ad.groupTuple()
    '''

    // EVALUATE of the generated cells `generated` (a channel of [meta, h5ad]) against PREPARE's test cells
    static String evaluate(String generated) {
        return """
        input[0] = PREPARE.out.h5ad.map { meta, _train, test -> [meta, test] }
            .join(${generated})
            .join(ENCODE.out.reconstruction)
        """
    }
}
