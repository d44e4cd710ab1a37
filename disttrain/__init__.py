"""disttrain: data-parallel training that compares ways of keeping workers in step.

Three synchronizers share one training loop and one communicator interface:

* ``disttrain.sync.AllReduce`` - dense gradient all-reduce, the baseline;
* ``disttrain.sync.GTC`` - gradient threshold compression (Strom 2015);
* ``disttrain.sync.BMUF`` - blockwise model-update filtering (Chen & Huo 2016).

Adding one to your own loop takes two lines::

    comm = disttrain.comm.TorchCommunicator()          # reads torchrun's environment
    with disttrain.sync.AllReduce(comm).attach(model, optimizer):
        for x, y in loader:                             # your loop, unchanged
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()                            # exchange happens in hooks here
"""

__version__ = "0.1.0"
