process TRAIN_VAE {
    tag "${meta.id}"
    label 'process_gpu'

    conda "${moduleDir}/../../../containers/environment.yml"
    container "${ task.accelerator ? task.ext.container_gpu : task.ext.container_cpu }"

    input:
    tuple val(meta), path(tokens)

    output:
    tuple val(meta), path('vae')                 , emit: vae
    tuple val(meta), path('vae/history.csv')     , emit: history
    tuple val("${task.process}"), val('sclatent'), eval('sclatent --version | sed "s/.* //"'), topic: versions
    tuple val("${task.process}"), val('torch'), eval('sclatent version torch'), topic: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args    = task.ext.args ?: ''
    def device  = task.accelerator ? 'cuda' : 'cpu'
    // more than one GPU: torchrun starts one DDP process per GPU, each running the same `sclatent` command
    // (--batch-size stays the global batch); --standalone takes a free port, so tasks on one node never collide
    def n_gpus  = task.accelerator ? (task.accelerator.request ?: 1) as int : 0
    def launch  = n_gpus > 1 ? "torchrun --standalone --nproc_per_node ${n_gpus} --no-python sclatent" : 'sclatent'
    def threads = n_gpus > 1 ? Math.max(1, task.cpus.intdiv(n_gpus)) : task.cpus
    """
    ${launch} train-vae \\
        --tokens ${tokens} \\
        --outdir vae \\
        --device ${device} \\
        --threads ${threads} \\
        --no-progress \\
        ${args}
    """

    stub:
    """
    mkdir -p vae
    touch vae/checkpoint.pt vae/config.json
    echo 'step,epoch,loss' > vae/history.csv
    """
}
