from speedysvc import ServerMethodsBase, json_method

class EchoServer(ServerMethodsBase):
    port = 5555
    name = 'echo_serv'

    @json_method
    def echo_json(self, data):
        return data
